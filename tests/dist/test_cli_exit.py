"""An entry point that returns on every rank of a gloo world leaves it together: ``run_cli`` waits for
the other ranks and closes the default process group, so no rank tears its connections down while a peer
still reads from them (that race aborted the quick start's sweep at exit, SIGABRT in both ranks)."""

import os

import torch
import torch.distributed as dist

from megatron.cli_errors import run_cli
from megatron.testing.distributed import run_distributed


def _entry_point(rank, world_size, store):
    def main(argv):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        return 0 if rank else int(t.item())  # rank 0 'prints' its result; the others return at once

    status = run_cli(main, [])
    closed = not dist.is_initialized()
    # run_distributed closes the group it opened: give it one to close.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    return status, closed


def test_run_cli_closes_the_group_on_every_rank(tmp_path):
    store = os.path.join(tmp_path, "store")
    results = run_distributed(_entry_point, 2, store, timeout=60)
    assert results == [(3, True), (0, True)]


def test_run_cli_without_a_group_does_nothing():
    assert not dist.is_initialized()
    assert run_cli(lambda argv: 0, []) == 0
