"""Checkpoints of the training loop: exact resume, SIGTERM with --exit-signal-handler, a kill during a save."""

import os
import signal
import time

import pytest
import torch

from megatron.optimizer import MixedPrecisionOptimizer
from megatron.testing.distributed import DistributedTestError, run_distributed
from megatron.checkpoint import read_tracker
from pretrain_early_exit_gpt import main
from megatron.testing.training import run_main, tiny_argv

# Dropout stays on (0.1) and the exit weights warm up: resuming must restore the RNG streams and
# recompute the weights from the iteration.
RESUME = dict(train_iters=6, eval_iters=1, eval_interval=2, exit_layer_weight_warmup_iters=4, log_interval=3)


def _steps(result):
    return [(h["iteration"], h["losses"], h["grad_norm"], h["lr"]) for h in result.history]


@pytest.mark.parametrize("world, flags", [
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
    (2, ["--bf16", "--pipeline-model-parallel-size", "2"]),
], ids=["tp2pp2", "distributed-optimizer-dp2", "bf16-pp2"])
def test_resume_is_exact(tmp_path, world, flags):
    """6 iterations straight (saving at 3) equal 3, load, 3 more: losses, grad norms and lr bit-equal."""
    straight = run_main(world, tiny_argv(*flags, save=tmp_path / "a", save_interval=3, **RESUME))[0]
    resumed = run_main(world, tiny_argv(*flags, load=tmp_path / "a", load_iteration=3, save=tmp_path / "b",
                                        save_interval=3, **RESUME))[0]
    assert [s[0] for s in _steps(resumed)] == [4, 5, 6]
    assert _steps(resumed) == _steps(straight)[3:]
    assert resumed.evaluations == straight.evaluations[-len(resumed.evaluations):]
    assert read_tracker(str(tmp_path / "b")) == (6, False)


def _sigterm_at_third_step(rank, world, argv):
    """Rank 0 alone gets a real SIGTERM during its third iteration; every rank must stop there together."""
    if rank == 0:
        real, calls = MixedPrecisionOptimizer.step, []

        def step(self):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self)

        MixedPrecisionOptimizer.step = step
    return main(argv)


def test_sigterm_saves_and_the_checkpoint_resumes(tmp_path):
    argv = tiny_argv("--exit-signal-handler", pipeline_model_parallel_size=2, train_iters=20,
                     save=tmp_path / "ckpt", save_interval=100)
    stopped = run_distributed(_sigterm_at_third_step, 2, argv)
    assert [r.exit_reason for r in stopped] == ["signal", "signal"] and stopped[0].iteration == 3
    assert read_tracker(str(tmp_path / "ckpt")) == (3, False)
    later = dict(pipeline_model_parallel_size=2, train_iters=20, exit_interval=5)
    resumed = run_main(2, tiny_argv(load=tmp_path / "ckpt", **later))[0]
    straight = run_main(2, tiny_argv(**later))[0]
    assert resumed.exit_reason == straight.exit_reason == "interval"
    assert [s[0] for s in _steps(resumed)] == [4, 5]
    assert _steps(resumed) == _steps(straight)[3:]


_REAL_SAVE = torch.save


def _killed_in_second_save(rank, world, argv):
    """Rank 1 dies half-way through writing its file of the second checkpoint (like SIGKILL)."""
    writes = []

    def save(obj, f, *args, **kwargs):
        if rank == 1 and isinstance(obj, dict) and "iteration" in obj:
            writes.append(obj["iteration"])
            if len(writes) == 2:
                f.write(b"PK\x03\x04 torn")
                f.flush()
                os._exit(1)
        return _REAL_SAVE(obj, f, *args, **kwargs)

    torch.save = save
    return main(argv)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    argv = tiny_argv(pipeline_model_parallel_size=2, train_iters=6, save=tmp_path / "ckpt", save_interval=2)
    with pytest.raises(DistributedTestError):
        run_distributed(_killed_in_second_save, 2, argv, timeout=60)
    assert read_tracker(str(tmp_path / "ckpt")) == (2, False)
    resumed = run_main(2, tiny_argv(pipeline_model_parallel_size=2, train_iters=6, load=tmp_path / "ckpt"))[0]
    assert [h["iteration"] for h in resumed.history] == [3, 4, 5, 6]


def test_checkpoint_args_and_missing_checkpoint(tmp_path):
    """--use-checkpoint-args supplies the model flags left out; --no-load-optim / --no-load-rng still resume
    the iteration and data position; --exit-on-missing-checkpoint refuses an empty --load."""
    run_main(1, tiny_argv(train_iters=4, save=tmp_path / "ckpt", save_interval=2, exit_interval=2))
    shapeless = tiny_argv("--use-checkpoint-args", "--no-load-optim", "--no-load-rng", train_iters=4,
                          load=tmp_path / "ckpt", num_layers=None, hidden_size=None, num_attention_heads=None,
                          exit_layer_nums=None, exit_layer_weight=None)
    resumed = run_main(1, shapeless)[0]
    assert [h["iteration"] for h in resumed.history] == [3, 4]
    assert set(resumed.history[0]["losses"]) == {"lm loss", "early loss [1]", "early loss [3]"}
    with pytest.raises(DistributedTestError, match="--exit-on-missing-checkpoint"):
        run_main(1, tiny_argv("--exit-on-missing-checkpoint", load=tmp_path / "nothing"))


def _started_an_hour_ago(rank, world, argv):
    return main(argv, start_time=time.time() - 3600)


def test_exit_duration_saves_and_stops(tmp_path):
    argv = tiny_argv(pipeline_model_parallel_size=2, train_iters=20, exit_duration_in_mins=1,
                     save=tmp_path / "ckpt", save_interval=100)
    results = run_distributed(_started_an_hour_ago, 2, argv)
    assert [(r.exit_reason, r.iteration) for r in results] == [("duration", 1)] * 2
    assert read_tracker(str(tmp_path / "ckpt")) == (1, False)


def test_progress_lives_on_the_run_and_reaches_args_only_at_saves(tmp_path, monkeypatch):
    """Iteration and consumed samples are the run's state: ``args`` (what a checkpoint stores) receives them
    when a checkpoint is written, and never without a save; a fine-tune restarts them at zero."""
    from megatron.arguments import parse_args
    from megatron.training import resume
    from megatron.training.training import pretrain

    stored, real = [], resume.save_checkpoint

    def spy(save_dir, iteration, *rest, **kwargs):
        args = rest[4]  # (chunks, optimizer, scheduler, state, args)
        stored.append((iteration, args.iteration, args.consumed_train_samples))
        return real(save_dir, iteration, *rest, **kwargs)

    monkeypatch.setattr(resume, "save_checkpoint", spy)
    saved = parse_args(tiny_argv(train_iters=3, save=tmp_path / "c", save_interval=2))
    pretrain(saved)
    assert stored == [(2, 2, 16), (3, 3, 24)]  # global batch 8
    unsaved = parse_args(tiny_argv(train_iters=2))
    lines = pretrain(unsaved).lines
    assert "consumed samples: 16 |" in " ".join(lines[-1].split())
    assert not hasattr(unsaved, "consumed_train_samples") and not hasattr(unsaved, "iteration")
    tuned = pretrain(parse_args(tiny_argv("--finetune", train_iters=1, load=tmp_path / "c")))
    assert [h["iteration"] for h in tuned.history] == [1]
    assert "consumed samples: 8 |" in " ".join(tuned.lines[0].split())
