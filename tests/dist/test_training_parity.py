"""The training entry point end to end in gloo worlds: layout parity of the logged losses, the distributed
optimizer against the plain one, and learning on structured mock data (``tiny_argv``, ``run_main``,
``logged_losses``: ``megatron/testing/training.py``)."""

import pytest

from megatron.testing.training import NO_DROPOUT, TINY, logged_losses, run_main, tiny_argv
from megatron.testing.training import losses_close as _close


@pytest.mark.parametrize("world, layout", [
    (4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    (4, dict(pipeline_model_parallel_size=2)),  # dp 2
    (2, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)),
], ids=["tp2pp2dp1", "tp1pp2dp2", "pp2-vpp2"])
def test_layout_parity_of_logged_losses(world, layout):
    """Same seed, data and global batch with dropout off: the logged final and exit losses of the first
    iterations agree with tp1pp1dp1 to 1e-5 (the console prints 7 significant digits)."""
    want = logged_losses(run_main(1, tiny_argv(**NO_DROPOUT))[0])
    got = logged_losses(run_main(world, tiny_argv(**NO_DROPOUT, **layout))[0])
    assert len(want) == len(got) == TINY["--train-iters"]
    assert set(want[0]) == {"lm loss", "early loss [1]", "early loss [3]"}
    for w, g in zip(want, got):
        assert _close(g, w, 1e-5), (g, w)


@pytest.mark.parametrize("dp", [2, 4])
def test_distributed_optimizer_follows_plain_optimizer(dp):
    argv = tiny_argv(train_iters=5, global_batch_size=16)
    plain = run_main(dp, argv)[0].history
    sharded = run_main(dp, argv + ["--use-distributed-optimizer"])[0].history
    assert [h["iteration"] for h in sharded] == [1, 2, 3, 4, 5]
    for p, s in zip(plain, sharded):
        assert _close(s["losses"], p["losses"], 1e-5), (s, p)
        assert abs(s["grad_norm"] - p["grad_norm"]) <= 1e-5 * p["grad_norm"]


def test_tiny_early_exit_model_learns_mock_data():
    """The mock data is a sparse Markov chain (entropy about 1 nat): the final loss and every exit loss
    fall far below their start, log(32) = 3.47."""
    argv = tiny_argv(seq_length=32, micro_batch_size=8, global_batch_size=8, vocab_size=32,
                     exit_layer_weight=None, train_iters=250, lr=5e-3, min_lr=5e-4,
                     lr_decay_style="cosine", lr_warmup_iters=10, weight_decay=0, log_interval=50,
                     pipeline_model_parallel_size=2, **NO_DROPOUT)
    history = run_main(2, argv)[0].history
    first, last = history[0]["losses"], history[-10:]
    assert set(first) == {"lm loss", "early loss [1]", "early loss [3]"}
    for key, start in first.items():
        end = sum(h["losses"][key] for h in last) / len(last)
        assert start > 3.0 and end < 1.4, (key, start, end)


def test_tensorboard_gets_every_stage_losses(tmp_path):
    """One writer (the reporting rank) holds every stage's exit losses, weights, timers and validation."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_main(2, tiny_argv("--log-timers-to-tracker", "--log-validation-ppl-to-tracker", train_iters=2,
                          pipeline_model_parallel_size=2, eval_iters=1, eval_interval=2, tensorboard_dir=tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lm loss", "train/early loss [1]", "train/early loss [3]", "train/exit weight [3]",
            "train/learning-rate", "train/grad-norm", "timer/forward-backward", "validation/early loss [1]",
            "validation/lm loss ppl"} <= tags
    assert [e.step for e in events.Scalars("train/early loss [1]")] == [1, 2]
