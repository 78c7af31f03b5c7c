"""``--exit-signal-handler``: record a signal (SIGTERM from SLURM preemption) and let every rank agree on it.

The scheduler may signal only some processes, or signal them at different moments. The handler only
records the signal; the training loop calls :meth:`DistributedSignalHandler.signals_received` once per
iteration, which all-reduces the flag (MAX) over the world, so every rank sees the signal at the same
iteration, saves the same checkpoint and exits together.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

__all__ = ["DistributedSignalHandler"]


class DistributedSignalHandler:
    """Context manager: installs a recording handler for ``sig`` on entry, restores the old one on exit.

    ``group``: the process group to agree over (default: the world)."""

    def __init__(self, sig: int = signal.SIGTERM, group=None):
        self.sig = sig
        self.group = group
        self._received = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> "DistributedSignalHandler":
        self._received = False
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._record)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self, signum, frame) -> None:
        self._received = True

    def release(self) -> None:
        """Put the previous handler back (idempotent)."""
        if self._installed:
            signal.signal(self.sig, self._previous)
            self._installed = False

    @property
    def received_locally(self) -> bool:
        """Whether this process got the signal (no communication)."""
        return self._received

    def signals_received(self) -> bool:
        """Whether any rank got the signal. Collective: every rank of the group must call it at the same
        point of the loop."""
        if not dist.is_initialized():
            return self._received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else "cpu"
        flag = torch.tensor([int(self._received)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
