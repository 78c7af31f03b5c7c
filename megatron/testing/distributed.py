"""Run a function in N processes (gloo, or NCCL on GPUs) from a test, a benchmark or a notebook.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` workers, initialises a process group in
each (a fresh file store, so no port can collide), calls ``fn(rank, world_size, *args)`` and returns the
per-rank results in rank order. A failure in any rank is re-raised in the caller as
:class:`DistributedTestError` carrying that rank's traceback; a hang is turned into an error after
``timeout`` seconds and every worker is killed.

``backend="gloo"`` (the default) forks the workers (0.1-0.5 s per world instead of seconds for
``spawn``); they set ``torch.set_num_threads(1)`` first thing: a forked child whose parent already ran a
multithreaded op otherwise hangs in libgomp. ``backend="nccl"`` gives rank ``r`` GPU ``r``
(``LOCAL_RANK``, ``torch.cuda.set_device``, ``device_id``) and *spawns* the workers, since CUDA cannot be
used in a child forked from a parent that has used it: ``fn``, its arguments and results must then be
picklable (module-level functions). ``start_method`` overrides the choice.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["run_distributed", "DistributedTestError", "BACKENDS"]


class DistributedTestError(RuntimeError):
    """A worker raised, died or timed out."""


BACKENDS = ("gloo", "nccl")


def _worker(fn: Callable, rank: int, world_size: int, store_path: str, timeout: float, results, args, kwargs,
            backend: str = "gloo"):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        extra = {}
        if backend == "nccl":
            os.environ["LOCAL_RANK"] = str(rank)
            torch.cuda.set_device(rank)
            extra["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
            **extra,
        )
        try:
            out = fn(rank, world_size, *args, **kwargs)
            # Plain pickle copies tensor data into the message; the queue's own pickler would share it
            # through file descriptors that die with this process before the parent reads them.
            results.put((rank, True, pickle.dumps(out)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()


def _check_backend(backend: str, world_size: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"run_distributed: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world_size:
            raise DistributedTestError(f"backend 'nccl' with {world_size} ranks needs {world_size} GPUs, "
                                       f"{gpus} visible; use backend='gloo' or fewer ranks")


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo",
                    start_method: str | None = None, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    Forked workers (gloo) need ``fn`` and its arguments picklable only in the result direction (closures
    and lambdas work as ``fn``); spawned ones (nccl) need everything picklable."""
    _check_backend(backend, world_size)
    ctx = mp.get_context(start_method or ("spawn" if backend == "nccl" else "fork"))
    results = ctx.Queue()
    fd, store_path = tempfile.mkstemp(prefix="ee_megatron_store_")
    os.close(fd)
    os.unlink(store_path)  # the file store creates it; a stale file would confuse a new world
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, store_path, timeout, results, args, kwargs, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs) - set(failures))
                raise DistributedTestError(
                    f"ranks {missing} did not finish within {timeout:.0f}s (deadlock?)"
                    + _format_failures(failures)
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in outputs and r not in failures]
                for r in dead:
                    failures[r] = f"worker exited with code {procs[r].exitcode} without reporting"
                continue
            (outputs if ok else failures)[rank] = pickle.loads(payload) if ok else payload
            if failures:
                # Give the others a moment to report their own errors (often the root cause), then stop.
                time.sleep(0.2)
                while True:
                    try:
                        rank, ok, payload = results.get_nowait()
                    except queue.Empty:
                        break
                    (outputs if ok else failures)[rank] = pickle.loads(payload) if ok else payload
                raise DistributedTestError("distributed test failed" + _format_failures(failures))
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        if os.path.exists(store_path):
            os.unlink(store_path)
    return [outputs[r] for r in range(world_size)]


def _format_failures(failures: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
