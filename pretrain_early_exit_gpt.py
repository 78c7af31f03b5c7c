#!/usr/bin/env python
"""Pre-train (or EE-Tune) an early-exit GPT with Megatron / EE-LLM flags.

    torchrun --nproc_per_node 4 pretrain_early_exit_gpt.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --num-layers 4 --hidden-size 64 ... --exit-layer-nums 2 3

Runs under ``torchrun`` (CPU with gloo or CUDA with NCCL, chosen automatically; ``--device cpu|cuda``
forces one) or as a plain ``python`` process (world size 1). The flags are validated as a whole before
any process group exists; a bad flag exits with status 2 and a message naming it and the fix.
See ``examples/ee_training/`` for launch scripts.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.arguments import parse_args  # noqa: E402
from megatron.checkpoint import CheckpointError  # noqa: E402
from megatron.config import ConfigError  # noqa: E402
from megatron.training.logging_utils import configure_logging  # noqa: E402
from megatron.training.setup import world_from_env  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402

_START = time.time()  # --exit-duration-in-mins counts from process start, as Megatron's


def main(argv: list[str] | None = None, start_time: float | None = None):
    """Parse ``argv`` (default: the command line), train, and return the run's
    :class:`~megatron.training.loop.TrainResult` for this rank. ``start_time``: when the job started
    (for --exit-duration-in-mins; default now)."""
    args = parse_args(argv)
    configure_logging(world_from_env()[0])
    return pretrain(args, start_time=start_time)


if __name__ == "__main__":
    try:
        main(start_time=_START)
    except (ConfigError, CheckpointError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
