"""Activation recompute through the training entry point: at pp = 4 with exits and dropout on,
``--recompute-granularity full`` and ``selective`` log the same losses and grad norm as no recompute,
under plain 1F1B, interleaving and ``--fill-explicit-bubbles`` (issue 14, item 1)."""

import re

import pytest

from megatron.core.pipeline_parallel.schedules import early_exit_bubble_filling
from megatron.testing.training import logged_losses, run_main, tiny_argv

RECOMPUTE = {
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],
}
SCHEDULES = {
    "1f1b": [],
    "interleaved": ["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "1", "--exit-layer-nums", "2",
                    "7", "--exit-layer-weight", "0.3", "0.5"],
    "filling": ["--fill-explicit-bubbles", "--global-batch-size", "16"],
}
_GRAD_NORM = re.compile(r"\| grad norm: ([-+.\dE]+) \|")
_CONSUMED = re.compile(r"\| consumed samples: +(\d+) \|")


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_recompute_logs_the_same_losses_and_grad_norm(schedule):
    base = tiny_argv("--pipeline-model-parallel-size", "4", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                     train_iters=2, *SCHEDULES[schedule])
    want = run_main(4, base, timeout=240)[0]
    assert len(logged_losses(want)) == 2 and len(logged_losses(want)[0]) == 3
    for mode, flags in RECOMPUTE.items():
        got = run_main(4, base + flags, timeout=240)[0]
        assert logged_losses(got) == logged_losses(want), mode
        assert [_GRAD_NORM.search(line).group(1) for line in got.lines if line.startswith(" iteration")] == \
            [_GRAD_NORM.search(line).group(1) for line in want.lines if line.startswith(" iteration")], mode
        assert [h["grad_norm"] for h in got.history] == [h["grad_norm"] for h in want.history], mode


def test_filling_reads_its_fill_microbatches_in_addition_to_the_global_batch():
    """Issue 14, item 7: the consumed-samples counter counts the fills, read beyond --global-batch-size
    (EE-LLM took them out of the batch; see schedules/filling.py)."""
    got = run_main(4, tiny_argv("--pipeline-model-parallel-size", "4", train_iters=2, *SCHEDULES["filling"]))[0]
    per_step = early_exit_bubble_filling(4, 8, [0, 2]).header.num_microbatches_total * 2  # exits 1, 3: stages 0, 2
    assert per_step > 16
    assert [int(_CONSUMED.search(line).group(1)) for line in got.lines if line.startswith(" iteration")] == \
        [per_step, 2 * per_step]
