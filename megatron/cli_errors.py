"""How every command-line entry point reports an error: one line, exit status 2.

Our refusals (a bad flag, a missing or corrupt data file, a checkpoint that does not match) carry messages
that name the flag or file and the fix; a traceback around them only hides that line. :func:`run_cli` runs
an entry point's ``main`` and turns such an error into ``<prog>: error: <message>`` on stderr and status 2.
Other exceptions (bugs) keep their traceback. ``EE_MEGATRON_DEBUG=1`` in the environment shows the traceback
of every error.

Under torchrun (``WORLD_SIZE`` > 1) each line is prefixed by the rank, ``[rank 3/8] ...``: identical
refusals of all ranks read as one message, and an error only one rank meets (its checkpoint file) is still
seen and attributed.

Usage, in each entry point: ``if __name__ == "__main__": sys.exit(run_cli(main))``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["DEBUG_ENV", "USER_ERRORS", "is_user_error", "error_line", "run_cli"]

DEBUG_ENV = "EE_MEGATRON_DEBUG"
# Raised with a message meant for the user: bad values (every flag / file / config error here is a
# ValueError), missing optional packages, unusable paths.
USER_ERRORS = (ValueError, ImportError, OSError)
_OUR_PACKAGES = ("megatron", "tools", "__main__")  # __main__: a script's own error classes


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal whose message is the whole story: one of :data:`USER_ERRORS`, or an
    exception class of this project (e.g. ``CheckpointError``)."""
    if isinstance(exc, USER_ERRORS):
        return True
    return type(exc).__module__.split(".")[0] in _OUR_PACKAGES


def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.endswith(".__main__"):  # python -m package
        return f"python -m {spec.name[:-len('.__main__')]}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def error_line(exc: BaseException, prog: str | None = None) -> str:
    """``[rank R/W] <prog>: error: <message>`` (the rank only under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = f"[rank {os.environ.get('RANK', '?')}/{world}] " if world > 1 else ""
    message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
    return f"{rank}{prog or _prog()}: error: {message}"


def run_cli(main: Callable, argv: list[str] | None = None, prog: str | None = None) -> int:
    """``main(argv)``'s exit status (0 unless it returns an int); a user error prints :func:`error_line` and
    returns 2. After a normal return the default process group, if one is open, is closed on every rank
    together (:func:`_leave_process_group`)."""
    try:
        status = main(argv)
    except Exception as exc:  # noqa: BLE001 - only user errors are caught; the rest re-raise below
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not is_user_error(exc):
            raise
        print(error_line(exc, prog), file=sys.stderr, flush=True)
        return 2
    _leave_process_group()
    return status if isinstance(status, int) else 0


def _leave_process_group() -> None:
    """After a ``main`` that returned on every rank: wait for the others, then close the default process
    group. Ranks that simply exit tear their gloo connections down while a peer's background thread may
    still read from them, which aborts that peer (SIGABRT) at random; a closed group has no such thread.
    Nothing to do when ``main`` closed it already (training does) or never opened one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
