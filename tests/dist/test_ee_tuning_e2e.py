"""EE-Tuning end to end on a converted model (issue 8 acceptance): a tiny random Hugging Face Llama (GQA) is
converted to our layout at pp 2 (tools/checkpoint/util.py), gets norm + MLP exits copied from the model
(checkpoint_converter.py add-exit), and is tuned through the entry point with --tune-exit --finetune.

Proves: the exit losses fall; every backbone tensor of the saved checkpoint is bit-identical to the loaded
one; the saved optimizer holds Adam state for exactly the exit tensors; with
--tune-exit-pipeline-parallel-size 1 only stage 0's files are deserialised and stage 1's are carried over
byte for byte."""

import filecmp
import os
from collections import Counter

import pytest
import torch

from megatron.checkpoint import checkpoint_file, read_file
from megatron.testing.distributed import run_distributed
from pretrain_early_exit_gpt import main
from megatron.testing.training import run_main

transformers = pytest.importorskip("transformers")

from tools.checkpoint import checkpoint_converter, util  # noqa: E402

PP = 2
EXITS = (1, 3)  # one exit on each stage of the 4-layer model
STEPS = 20
RUN = ["--mock-data", "--use-checkpoint-args", "--finetune", "--pipeline-model-parallel-size", str(PP),
       "--vocab-size", "64", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
       "--lr", "1e-2", "--min-lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0"]
TUNE = RUN + ["--tune-exit", "--tune-exit-pipeline-parallel-size", str(PP), "--train-iters", str(STEPS),
              "--save-interval", str(STEPS)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF Llama (4 layers, 4 heads over 2 kv groups) -> ours at tp 1 pp 2 (iteration 1); its directory."""
    work = tmp_path_factory.mktemp("ee_tuning")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=None, eos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "hf")
    util.main(["--model-type", "EarlyExitGPT", "--loader", "llama_hf", "--saver", "megatron",
               "--load-dir", str(work / "hf"), "--save-dir", str(work / "base"),
               "--target-pipeline-parallel-size", str(PP)])
    return work


def _add_exits(converted, layers) -> str:
    """The converted model + copy-initialised norm + MLP exits at ``layers`` (iteration 1)."""
    out = converted / ("exits_" + "_".join(map(str, layers)))
    if not out.exists():
        checkpoint_converter.main(["--conversion-type", "add-exit", "--load-dir", str(converted / "base"),
                                   "--load-iteration", "1", "--save-dir", str(out),
                                   "--add-exit-layer-nums", *map(str, layers), "--use-exit-norm", "--use-exit-mlp"])
    return str(out)


def _is_exit(key: str) -> bool:
    """EE-Tuning's trainable tensors (EE-LLM's ``megatron/training.py`` under --tune-exit): exit norms /
    projections / blocks and MLP branches."""
    return "exit" in key or ".branch." in key


def _stage(root, iteration, stage) -> dict:
    return read_file(checkpoint_file(str(root), iteration, 0, stage, PP))


def test_tuning_a_converted_llama_trains_only_the_exits(converted, tmp_path):
    exits_ckpt = _add_exits(converted, EXITS)
    tuned = tmp_path / "tuned"
    history = run_main(PP, TUNE + ["--load", exits_ckpt, "--save", str(tuned)])[0].history
    for layer in EXITS:
        losses = [h["losses"][f"early loss [{layer}]"] for h in history]
        assert len(losses) == STEPS and sum(losses[-5:]) / 5 < 0.75 * losses[0], (layer, losses)
    assert all(set(h["losses"]) == {f"early loss [{x}]" for x in EXITS} for h in history)  # no lm loss

    for stage in range(PP):
        before, after = _stage(exits_ckpt, 1, stage)["model"], _stage(tuned, STEPS, stage)
        model = after["model"]
        assert model.keys() == before.keys()
        exit_keys = [k for k in model if _is_exit(k)]
        backbone = [k for k in model if not _is_exit(k)]
        assert exit_keys and len(backbone) > len(exit_keys)
        for k in backbone:  # bit-identical, dtype included
            assert model[k].dtype == before[k].dtype and torch.equal(model[k], before[k]), k
        assert all(not torch.equal(model[k], before[k]) for k in exit_keys)  # every exit tensor trained

        # Adam moments for the exit tensors only: as many states as exit tensors, the same shapes, every
        # one stepped STEPS times, and nothing sized like the (larger) whole stage.
        optim = after["optimizer"]["optimizer"]
        states = optim["state"]
        indexed = sorted(i for group in optim["param_groups"] for i in group["params"])
        assert indexed == sorted(states) == list(range(len(exit_keys)))
        assert Counter(tuple(s["exp_avg"].shape) for s in states.values()) == \
            Counter(tuple(model[k].shape) for k in exit_keys)
        for s in states.values():
            assert s["exp_avg_sq"].shape == s["exp_avg"].shape and int(s["step"]) == STEPS
            assert s["exp_avg_sq"].abs().sum() > 0
        assert sum(s["exp_avg"].numel() for s in states.values()) == sum(model[k].numel() for k in exit_keys)


def _recording_worker(rank, world, argv):
    """``main(argv)`` while recording every file ``torch.load`` deserialises (this forked worker's copy of
    torch is patched; the test process is untouched)."""
    loaded = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        loaded.append(os.path.abspath(os.fspath(f)) if isinstance(f, (str, os.PathLike)) else repr(f))
        return real_load(f, *args, **kwargs)

    torch.load = load
    try:
        return main(argv), loaded
    finally:
        torch.load = real_load


def test_partial_tuning_reads_only_stage_0_and_carries_stage_1_over(converted, tmp_path):
    # Tuning k stages needs every exit inside them (EE-LLM's 70B single-exit setting: its exit on stage 0).
    exits_ckpt = _add_exits(converted, EXITS[:1])
    tuned = tmp_path / "tuned"
    argv = TUNE + ["--load", exits_ckpt, "--save", str(tuned), "--tune-exit-pipeline-parallel-size", "1"]
    result, loaded = run_distributed(_recording_worker, 1, argv, timeout=120)[0]
    assert {tuple(h["losses"]) for h in result.history} == {(f"early loss [{EXITS[0]}]",)}
    assert result.iteration == STEPS

    stage_dirs = [os.path.dirname(checkpoint_file(exits_ckpt, 1, 0, s, PP)) for s in range(PP)]
    assert any(path.startswith(stage_dirs[0] + os.sep) for path in loaded), loaded
    assert not [path for path in loaded if not path.startswith(stage_dirs[0] + os.sep)], loaded

    for name in sorted(os.listdir(stage_dirs[1])):
        saved = os.path.join(os.path.dirname(checkpoint_file(str(tuned), STEPS, 0, 1, PP)), name)
        assert filecmp.cmp(os.path.join(stage_dirs[1], name), saved, shallow=False), name
    # Stage 0 was tuned (its exit moved), and the result is a whole model that loads at full depth.
    before, after = _stage(exits_ckpt, 1, 0)["model"], _stage(tuned, STEPS, 0)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before if _is_exit(k))
    assert all(torch.equal(before[k], after[k]) for k in before if not _is_exit(k))
    full = run_main(PP, RUN + ["--load", str(tuned), "--train-iters", "1"])
    assert set(full[0].history[0]["losses"]) == {"lm loss", f"early loss [{EXITS[0]}]"}
