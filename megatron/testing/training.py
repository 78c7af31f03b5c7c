"""The training entry point (``pretrain_early_exit_gpt.main``) on a tiny early-exit model, from tests.

:func:`tiny_argv` builds the argv of a tiny run on mock data (:data:`TINY`: 4 layers, 32 wide, exits at
1 and 3, 4 iterations) with per-flag overrides; :func:`run_main` runs ``main(argv)`` on a gloo world and
returns every rank's ``TrainResult``; :func:`logged_losses` parses the losses back from the console
lines; :func:`losses_close` compares two loss dicts to a relative tolerance; :data:`NO_DROPOUT` turns
dropout off. ``main_worker`` is the module-level worker (picklable, for spawned NCCL worlds too).

``pretrain_early_exit_gpt`` is the repository's entry script, not part of the package: it is imported
when a run starts, so the checkout's root must be on ``sys.path`` (it is under pytest).
"""

from __future__ import annotations

import re

from megatron.testing.distributed import run_distributed

__all__ = ["TINY", "NO_DROPOUT", "tiny_argv", "main_worker", "run_main", "logged_losses", "losses_close"]

TINY = {
    "--num-layers": 4, "--hidden-size": 32, "--num-attention-heads": 4, "--seq-length": 16,
    "--micro-batch-size": 2, "--global-batch-size": 8, "--lr": 1e-3, "--vocab-size": 64,
    "--make-vocab-size-divisible-by": 16, "--exit-layer-nums": "1 3", "--exit-layer-weight": "0.3 0.5",
    "--log-interval": 1, "--eval-iters": 0, "--num-workers": 0, "--train-iters": 4,
}
NO_DROPOUT = dict(hidden_dropout=0, attention_dropout=0)


def tiny_argv(*flags, **overrides) -> list[str]:
    """Argv of a tiny early-exit run on mock data; ``overrides`` by flag name with underscores
    (``train_iters=6``), ``None`` drops a flag; ``flags`` are appended verbatim (switches)."""
    values = dict(TINY)
    for name, value in overrides.items():
        values[f"--{name.replace('_', '-')}"] = value
    argv = ["--mock-data"]
    for flag, value in values.items():
        if value is not None:
            argv += [flag, *str(value).split()]
    return argv + list(flags)


def main_worker(rank, world, argv):
    """One rank of :func:`run_main`: the entry point's ``main(argv)``."""
    from pretrain_early_exit_gpt import main

    return main(argv)


def run_main(world: int, argv: list[str], timeout: float = 120):
    """``main(argv)`` on ``world`` gloo ranks; the per-rank TrainResults."""
    import pretrain_early_exit_gpt  # noqa: F401 -- imported once here: the forked ranks inherit it

    return run_distributed(main_worker, world, argv, timeout=timeout)


_LOSS = re.compile(r" ((?:lm|early) loss(?: \[\d+\])?): ([-+.\dE]+) \|")


def logged_losses(result) -> list[dict[str, float]]:
    """Losses parsed back from the console lines (``--log-interval 1``) the reporting rank printed."""
    return [{k: float(v) for k, v in _LOSS.findall(line)} for line in result.lines if line.startswith(" iteration")]


def losses_close(a: dict, b: dict, rtol: float) -> bool:
    """Same keys, and every value of ``a`` within ``rtol`` (relative) of ``b``'s."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a)
