"""How the ranks of a multi-rank model serve one request together. Global rank 0 (the HTTP server)
broadcasts each request; every other rank waits for it in :func:`worker_loop`. All of them call
``generate`` with it and then :func:`agree_after_request`: one all-reduce of "did it succeed", so that no
rank starts the next request while another is still inside this one.

A generation that fails on every rank (or that every rank leaves) is an HTTP 500 and the server goes on.
One that leaves a rank stuck (a pipeline stage waiting in a collective for a stage that raised) cannot
be recovered here: the agreement times out, :class:`RanksDiverged` is raised on the ranks that see it and
they exit, which breaks the connections the stuck ranks wait on, so that every process of the model ends
and a supervisor (torchrun, SLURM, systemd) can restart it. A lost rank ends the same way.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Callable

import torch

from megatron.text_generation.request import (
    DEFAULT_LIMITS,
    SHUTDOWN,
    GenerationRequest,
    GenerationResult,
    broadcast_request,
)

__all__ = ["GenerateFn", "RanksDiverged", "accepts_stream", "agree_after_request", "distributed_generate", "worker_loop"]

log = logging.getLogger(__name__)

GenerateFn = Callable[[GenerationRequest], GenerationResult]


class RanksDiverged(RuntimeError):
    """The ranks of the model can no longer serve together: a rank is lost, or did not finish a request
    within ``sync_timeout_s`` of rank 0 (it is stuck in a collective of a generation that failed elsewhere).
    The process must exit so that a supervisor restarts the whole model."""


def agree_after_request(ok: bool, state, timeout_s: float) -> list[int]:
    """Every rank calls this after each request, with whether its ``generate`` succeeded: one all-reduce
    over the world, so no rank can start the next request while another is still inside this one. Returns
    the ranks that failed. Raises :class:`RanksDiverged` when the collective fails (a rank is lost) or
    does not complete within ``timeout_s`` (a rank is stuck in a generation that failed elsewhere). On
    success every rank leaves ``generate`` within moments of the others (its last step is a broadcast
    along the pipeline), so the timeout only ever runs out on a failure."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    device = state.device if torch.distributed.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    flags[rank] = 1 if ok else 2
    try:
        work = torch.distributed.all_reduce(flags, async_op=True)
        deadline, pause = time.monotonic() + timeout_s, 1e-4
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise RanksDiverged(f"not every rank finished the request within {timeout_s:g}s of rank "
                                    f"{rank} (a rank is stuck in a collective of a generation that failed elsewhere)")
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        work.wait()
        states = flags.tolist()
    except RanksDiverged:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure of the collective means a rank is gone
        raise RanksDiverged(f"the ranks could not confirm the request ({type(e).__name__}: {str(e)[:200]}): a "
                            "rank is lost") from e
    return [r for r, value in enumerate(states) if value != 1]


def accepts_stream(generate_fn) -> bool:
    """Whether ``generate_fn`` takes a ``stream`` callback (``generation.generate`` does)."""
    try:
        params = inspect.signature(generate_fn).parameters
    except (TypeError, ValueError):
        return False
    return "stream" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def distributed_generate(generate_fn: GenerateFn, state, sync_timeout_s: float = DEFAULT_LIMITS.sync_timeout_s
                         ) -> GenerateFn:
    """Rank 0's generate function of a multi-rank model: broadcast the request, generate with it, then
    agree with every rank that it is over (:func:`agree_after_request`). A generation that failed on
    rank 0 re-raises (HTTP 500) once the ranks agree; one that failed only elsewhere is a
    :class:`RuntimeError` naming the ranks. Must run under :class:`GenerationService`'s lock (it does,
    as the service's ``generate_fn``). When ``generate_fn`` takes a ``stream`` callback, so does the
    returned function; the callback stays on rank 0."""
    streams = accepts_stream(generate_fn)

    def run(request: GenerationRequest, stream=None) -> GenerationResult:
        try:
            request = broadcast_request(request, state)
        except Exception as e:  # noqa: BLE001 -- a broadcast that fails means a rank is gone
            raise RanksDiverged(f"the request could not be sent to every rank ({type(e).__name__}: "
                                f"{str(e)[:200]}): a rank is lost") from e
        try:
            result = generate_fn(request, stream=stream) if streams and stream is not None else generate_fn(request)
            error = None
        except Exception as e:  # noqa: BLE001 -- re-raised below, once every rank is out of the request
            result, error = None, e
        failed = agree_after_request(error is None, state, sync_timeout_s)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"the generation failed on rank(s) {failed} (see their logs)")
        return result
    return run


def worker_loop(generate_fn: GenerateFn, state, sync_timeout_s: float = DEFAULT_LIMITS.sync_timeout_s) -> int:
    """Every rank but global 0: receive each broadcast request, generate with it and agree with the other
    ranks that it is over, until :data:`SHUTDOWN`. Returns the number of requests served. A failing
    request is logged and the loop goes on when every rank comes out of it (rank 0 answers a 500); when
    they do not within ``sync_timeout_s`` (rank 0 may be waiting for this very rank, inside the failed
    generation) or rank 0 is gone, :class:`RanksDiverged` ends the loop: the process must exit, which
    also releases any rank still waiting for this one."""
    served = 0
    while True:
        request = broadcast_request(None, state)
        if isinstance(request, str) and request == SHUTDOWN:
            return served
        ok = True
        try:
            generate_fn(request)
        except Exception:  # noqa: BLE001 -- the worker must outlive one bad request, like rank 0
            log.exception("rank %s: request failed", getattr(state, "rank", "?"))
            ok = False
        agree_after_request(ok, state, sync_timeout_s)
        served += 1
