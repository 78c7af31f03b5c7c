"""Cached index arrays (``.npy`` named by the md5 of a description), built once and shared by all ranks.

Megatron's cache layout: ``<md5(desc)>.dsc`` holds the description and ``<md5(desc)>_<name>.npy`` the
arrays. The cache is looked up first in ``<data dir>/index-cache`` and then in ``--data-cache-path``;
when found in neither it is built in the last place looked.

When ``torch.distributed`` is initialised the first rank of ``group`` (global rank 0 by default) builds
the files while the others wait on a barrier; every file is written to a temporary name and renamed, so a
reader never sees half a file. A rank that still finds no files after the barrier (a node-local cache
directory on a multi-node job) builds them itself: the build is deterministic, so every copy is the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

import numpy as np

__all__ = ["IndexCacheError", "cached_arrays", "cache_paths"]


class IndexCacheError(OSError):
    """The index cache could not be written; the message names ``--data-cache-path``."""


def cache_paths(directory: str, desc: str, names: list[str]) -> dict[str, str]:
    digest = hashlib.md5(desc.encode("utf-8")).hexdigest()
    paths = {name: os.path.join(directory, f"{digest}_{name}.npy") for name in names}
    paths["desc"] = os.path.join(directory, f"{digest}.dsc")
    return paths


def _atomic_write(path: str, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(paths: dict[str, str], desc: str, arrays: dict[str, np.ndarray]) -> None:
    try:
        os.makedirs(os.path.dirname(paths["desc"]), exist_ok=True)
        for name, arr in arrays.items():
            _atomic_write(paths[name], lambda f, a=arr: np.save(f, a, allow_pickle=False))
        # The description goes last: its presence means every array is complete.
        _atomic_write(paths["desc"], lambda f: f.write(desc.encode("utf-8")))
    except OSError as exc:
        raise IndexCacheError(
            f"cannot write dataset index cache in {os.path.dirname(paths['desc'])} ({exc}); "
            "pass --data-cache-path pointing to a writable directory"
        ) from exc


def _complete(paths: dict[str, str]) -> bool:
    return all(os.path.isfile(p) for p in paths.values())


def _dist_info(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist, dist.get_rank(group=group) == 0


def cached_arrays(desc: str, names: list[str], build: Callable[[], dict[str, np.ndarray]],
                  directories: list[str], group=None) -> tuple[dict[str, np.ndarray], bool]:
    """Load the arrays ``names`` described by ``desc``, building them with ``build()`` if needed.

    Returns ``(arrays memory-mapped read-only, built_here)``. ``directories`` are searched in order and
    the last one receives a new build."""
    for directory in directories:
        paths = cache_paths(directory, desc, names)
        if _complete(paths):
            break
    built_here = False
    info = _dist_info(group)
    if info is not None:
        dist, is_builder = info
        error = None
        if is_builder and not _complete(paths):
            try:
                _save(paths, desc, build())
                built_here = True
            except Exception as exc:  # noqa: BLE001 - raised after the barrier so no rank hangs
                error = exc
        dist.barrier(group=group)
        if error is not None:
            raise error
    if not _complete(paths):
        _save(paths, desc, build())
        built_here = True
    return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}, built_here
