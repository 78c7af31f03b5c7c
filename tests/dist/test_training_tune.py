"""EE-Tuning through the entry point: only exit parameters train, --tune-exit-pipeline-parallel-size runs
and loads only the leading stages, and a save is still a complete model."""

import filecmp
import os
import shutil

import pytest
import torch

from megatron.checkpoint import checkpoint_file, read_tracker
from megatron.testing.distributed import DistributedTestError
from megatron.testing.training import run_main, tiny_argv

MODEL = dict(exit_layer_nums="1", exit_layer_weight="0.5", pipeline_model_parallel_size=2, train_iters=2,
             save_interval=2)
SWITCHES = ["--untie-exit-output-weights", "--use-exit-norm", "--use-exit-mlp"]


def _model(root, stage):
    return torch.load(checkpoint_file(str(root), 2, 0, stage, 2), weights_only=False)["model"]


def test_tune_first_stage_only_trains_exits_and_saves_a_complete_model(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_main(2, tiny_argv(*SWITCHES, save=base, **MODEL))
    # One process: tp 1 x 1 tuned stage x dp 1 of a two-stage model.
    result = run_main(1, tiny_argv(*SWITCHES, "--tune-exit", "--finetune", tune_exit_pipeline_parallel_size=1,
                                   load=base, save=tuned, eval_iters=1, eval_interval=1, **MODEL))[0]
    assert [set(h["losses"]) for h in result.history] == [{"early loss [1]"}] * 2  # no head runs
    assert {tuple(e) for _, e in result.evaluations} == {("early loss [1]",)}
    assert read_tracker(str(tuned)) == (2, False)
    before, after = _model(base, 0), _model(tuned, 0)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    exit_keys = {k for k in before if "exit" in k or ".branch." in k}
    assert changed and changed <= exit_keys
    assert any("exit_output_layer" in k for k in changed) and any(".branch." in k for k in changed)
    # The stage this run never built is copied unchanged, so the tuned checkpoint is a whole model.
    assert filecmp.cmp(checkpoint_file(str(base), 2, 0, 1, 2), checkpoint_file(str(tuned), 2, 0, 1, 2),
                       shallow=False)
    resumed = run_main(2, tiny_argv(*SWITCHES, "--finetune", load=tuned, **MODEL))[0]
    assert set(resumed.history[0]["losses"]) == {"lm loss", "early loss [1]"}

    # A --load without the unbuilt stages is refused before training, not in the middle of a save.
    shutil.rmtree(os.path.dirname(checkpoint_file(str(base), 2, 0, 1, 2)))
    with pytest.raises(DistributedTestError, match="must hold the whole model"):
        run_main(1, tiny_argv(*SWITCHES, "--tune-exit", "--finetune", tune_exit_pipeline_parallel_size=1,
                              load=base, save=tmp_path / "again", **MODEL))


def _consumed(root, iteration, stage):
    path = checkpoint_file(str(root), iteration, 0, stage, 2)
    return torch.load(path, weights_only=False)["args"].consumed_train_samples


def test_every_stage_resumes_the_tuning_run_progress_after_a_partial_save(tmp_path):
    """A partial save copies stage 1 from the base run (24 samples consumed) beside the tuned stage 0 (16):
    resuming the whole model takes the manifest's 16 on both stages, so they read the same data; without a
    manifest the disagreeing files are refused by name."""
    base, tuned, resumed = tmp_path / "base", tmp_path / "tuned", tmp_path / "resumed"
    longer = {**MODEL, "train_iters": 3, "save_interval": 3}
    run_main(2, tiny_argv(*SWITCHES, save=base, **longer))
    run_main(1, tiny_argv(*SWITCHES, "--tune-exit", "--finetune", tune_exit_pipeline_parallel_size=1, load=base,
                          save=tuned, **MODEL))
    assert (_consumed(tuned, 2, 0), _consumed(tuned, 2, 1)) == (16, 24)  # stage 1 is the base run's file
    # Continue training the whole model from the tuned checkpoint (a fresh optimizer: the tuned stage's
    # holds only exit parameters).
    resume = tiny_argv(*SWITCHES, "--no-load-optim", load=tuned, save=resumed, **longer)
    run_main(2, resume)
    assert (_consumed(resumed, 3, 0), _consumed(resumed, 3, 1)) == (24, 24)  # 16 + one global batch, both

    os.remove(tuned / "iter_0000002" / "manifest.json")  # as an older version wrote it
    with pytest.raises(DistributedTestError, match=r"files disagree on the consumed samples \(.*mp_rank_00_000.*: "
                                                   r"16 train.*mp_rank_00_001.*: 24 train.*--finetune"):
        run_main(2, resume)


def test_tuning_needs_a_checkpoint_in_load(tmp_path):
    """--tune-exit with a --load that holds nothing is refused (the exits would learn a random backbone),
    also without --exit-on-missing-checkpoint."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistributedTestError, match=r"--load .*empty has no latest_checkpointed_iteration.txt, and "
                                                   r"--tune-exit tunes the exits of a pretrained model"):
        run_main(1, tiny_argv(*SWITCHES, "--tune-exit", tune_exit_pipeline_parallel_size=1, load=tmp_path / "empty",
                              **MODEL))
