"""EE-Tuning through the entry point with the final head as teacher: a two-stage run with distillation,
the estimator and --use-exit-linear tuned from a checkpoint that has none of them raises the exit's
agreement with the final head, its estimator learns, only exit parameters change, and the saved
checkpoint holds the new tensors."""

import pytest
import torch

from megatron.checkpoint import checkpoint_file
from megatron.testing.training import run_main, tiny_argv

# The base model learns the mock data's Markov chain in its final head; its exits do not train (weight 0),
# so exit 1 starts far from the final head.
BASE = dict(exit_layer_nums="1 2", exit_layer_weight="0 0", pipeline_model_parallel_size=2, train_iters=150,
            save_interval=150, lr=3e-3)
TUNE = dict(exit_layer_nums="1 2", exit_layer_weight="1 1", pipeline_model_parallel_size=2,
            tune_exit_pipeline_parallel_size=2, train_iters=20, save_interval=20, lr=1e-2,
            exit_distillation_weight=1, exit_distillation_top_k=8, exit_vocab_size=8)
OURS = ["--use-exit-linear", "--exit-estimator"]


def _model(root, iteration, stage):
    return torch.load(checkpoint_file(str(root), iteration, 0, stage, 2), weights_only=False)["model"]


@pytest.mark.slow
def test_distillation_raises_agreement_and_saves_the_new_tensors(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_main(2, tiny_argv("--use-exit-norm", save=base, **BASE))
    result = run_main(2, tiny_argv("--use-exit-norm", "--tune-exit", "--finetune", *OURS, load=base, save=tuned,
                                   **TUNE))[0]
    history = [h["losses"] for h in result.history]
    assert set(history[0]) == {f"{k} [{layer}]" for k in ("early loss", "exit agreement", "estimator loss")
                               for layer in (1, 2)}  # no final loss: the head only teaches
    first, last = history[0]["exit agreement [1]"], sum(h["exit agreement [1]"] for h in history[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert sum(h["estimator loss [1]"] for h in history[-3:]) / 3 < 0.6 < history[0]["estimator loss [1]"]
    assert any(line.startswith(" iteration") and "exit agreement [1]: " in line for line in result.lines)

    before, after = _model(base, 150, 0), _model(tuned, 20, 0)
    new = set(after) - set(before)
    assert new == {f"language_model.encoder.layers.{i}.{part}" for i in (0, 1) for part in (
        "exit_linear.weight", "exit_linear.bias", "exit_estimator.hidden.weight", "exit_estimator.hidden.bias",
        "exit_estimator.output.weight", "exit_estimator.output.bias")} | {"exit_vocab"}
    assert after["language_model.encoder.layers.0.exit_linear.weight"].abs().sum() > 0  # it trained
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("exit" in k for k in changed)
    assert torch.equal(after["exit_vocab"], torch.full((8,), -1))  # unfilled until the exit-vocab conversion
    # Both exits live on stage 0; the head's stage 1 only taught them, so its file is the base's model.
    assert _model(tuned, 20, 1).keys() == _model(base, 150, 1).keys()
    # A resumed run takes the new tensors back (strictly: they are in the checkpoint now).
    resumed = run_main(2, tiny_argv("--use-exit-norm", "--tune-exit", "--finetune", *OURS, load=tuned,
                                    **{**TUNE, "train_iters": 1, "save_interval": None}))[0]
    assert resumed.history[0]["losses"]["exit agreement [1]"] > first + 0.15

