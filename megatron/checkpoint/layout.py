"""Megatron's checkpoint directory layout, the tracker file and atomic writes.

Layout (Megatron's ``get_checkpoint_name`` in ``megatron/checkpointing.py``, unchanged by EE-LLM)::

    <dir>/latest_checkpointed_iteration.txt         the iteration number, or ``release``
    <dir>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt
    <dir>/iter_0000100/mp_rank_TT[_PPP]/distrib_optim.pt   (--use-distributed-optimizer)
    <dir>/iter_0000100/manifest.json                 ours: checksums and progress (``manifest.py``)
    <dir>/release/...                                converted checkpoints

``_PPP`` appears whenever the *full* pipeline size is above 1, also in an EE-Tuning run that builds fewer
stages (EE-LLM's ``has_pipeline_parallel``). Every file is written to a temporary name in its final
directory (``.<name>.<random>.tmp``), flushed to disk and renamed over the target (``os.replace`` is atomic
on POSIX), so a reader sees either the old file or the complete new one, never a torn one; the writer
returns the sha256 of the bytes it wrote. A killed save leaves such temporary files behind:
:func:`remove_stale_temporaries` deletes them (only those names) once no save is in flight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from typing import Any, Callable

import torch

from .foreign_pickle import tolerant_pickle

__all__ = [
    "CheckpointError", "TRACKER_FILE", "MODEL_FILE", "DISTRIB_OPTIM_FILE", "iteration_dir", "rank_dir",
    "checkpoint_file", "read_tracker", "write_tracker", "atomic_write", "atomic_save", "torch_load",
    "saved_mp_ranks", "list_iterations", "is_temporary", "remove_stale_temporaries",
]

log = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
RELEASE = "release"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_ITERATION_DIR = re.compile(r"^iter_\d{7}$")
# The temporary names atomic_write gives (".<final name>.<mkstemp's random part>.tmp"): only these are
# ever removed as leftovers of a killed save.
_TEMPORARY = re.compile(r"^\.(?:model_optim_rng\.pt|distrib_optim\.pt|latest_checkpointed_iteration\.txt|"
                        r"manifest\.json)\.[A-Za-z0-9_]+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file or flag and the fix."""


def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    return os.path.join(root, RELEASE if release else f"iter_{iteration:07d}")


def rank_dir(root: str, iteration: int, tp_rank: int, pp_rank: int, full_pp: int, release: bool = False) -> str:
    """``iter_XXXXXXX/mp_rank_TT[_PPP]``; the ``_PPP`` suffix whenever ``full_pp > 1``."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if full_pp > 1 else "")
    return os.path.join(iteration_dir(root, iteration, release), name)


def checkpoint_file(root: str, iteration: int, tp_rank: int, pp_rank: int, full_pp: int,
                    release: bool = False, filename: str = MODEL_FILE) -> str:
    return os.path.join(rank_dir(root, iteration, tp_rank, pp_rank, full_pp, release), filename)


def read_tracker(root: str) -> tuple[int, bool] | None:
    """``(iteration, release)`` from the tracker file, or ``None`` when there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    fix = f"fix or delete the file, or choose the checkpoint with --load-iteration N (found: {list_iterations(root)})"
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} holds binary data ({raw[:16]!r}...), not an iteration number or 'release'; "
                              f"{fix}") from None
    if text == RELEASE:
        return 0, True
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number or 'release'; {fix}")
    return int(text), False


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (``torch.save`` writes sequentially; a
    writer that seeks would fail here on the missing ``seek`` instead of recording a wrong digest)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str, write: Callable) -> dict:
    """``write(fileobj)`` into a temporary file next to ``path``, fsync it, then rename it over ``path``.
    Returns ``{"sha256": hex digest, "bytes": size}`` of what was written."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            hashing = _HashingWriter(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return {"sha256": hashing.sha.hexdigest(), "bytes": hashing.bytes}


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself (the directory entry), so a power loss cannot undo it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> dict:
    """``torch.save`` that leaves either the old ``path`` or the complete new one; returns its digest."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_tracker(root: str, iteration: int | str) -> None:
    atomic_write(os.path.join(root, TRACKER_FILE), lambda f: f.write(f"{iteration}\n".encode()))


def torch_load(path: str) -> dict:
    """``torch.load`` of a checkpoint file onto the CPU, with an error naming a missing, truncated or corrupt
    file (no checksum check: read files through :func:`megatron.checkpoint.manifest.read_file`).
    ``weights_only=False``: the files hold an ``argparse.Namespace`` and numpy RNG state, and are trusted as
    the user's own checkpoints. Files written by EE-LLM / Megatron-LM load too (see :mod:`.foreign_pickle`)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError):
            # Pickled by EE-LLM / Megatron-LM: their own classes (e.g. args.model_type) load as placeholders.
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=tolerant_pickle)
    except Exception as e:  # zip / pickle / EOF errors all mean the same thing to the user
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                              "load an earlier iteration with --load-iteration N") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def saved_mp_ranks(root: str, iteration: int, release: bool = False) -> tuple[int, int | None] | None:
    """``(tp, pp)`` implied by the ``mp_rank_*`` directory names of an iteration (pp ``None`` without the
    ``_PPP`` suffix), or ``None`` when there are none. A partial EE-Tuning save holds fewer stages, so pp is
    only a lower bound; callers prefer the ``args`` stored in a file."""
    directory = iteration_dir(root, iteration, release)
    if not os.path.isdir(directory):
        return None
    matches = [m for m in (_RANK_DIR.match(n) for n in os.listdir(directory)) if m]
    if not matches:
        return None
    tp = 1 + max(int(m.group(1)) for m in matches)
    pps = [int(m.group(2)) for m in matches if m.group(2) is not None]
    return tp, (1 + max(pps)) if pps else None


def list_iterations(root: str) -> list[int]:
    """Iterations with an ``iter_*`` directory (for error messages)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n[5:]) for n in os.listdir(root) if _ITERATION_DIR.match(n))


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`atomic_write` gives its temporary files."""
    return bool(_TEMPORARY.match(name))


def remove_stale_temporaries(root: str) -> list[str]:
    """Delete the temporary files killed saves left under ``root`` (the tracker's, and those in every
    ``iter_*`` / ``release`` directory and its ``mp_rank_*`` directories); returns their paths. Only names
    :func:`atomic_write` gives are touched, and the caller must know that no save into ``root`` is in
    flight (``save_checkpoint`` calls it on global rank 0 after the last barrier of a save)."""
    if not os.path.isdir(root):
        return []
    dirs = [root]
    for name in os.listdir(root):
        if _ITERATION_DIR.match(name) or name == RELEASE:
            top = os.path.join(root, name)
            if os.path.isdir(top):
                dirs.append(top)
                dirs += [os.path.join(top, n) for n in os.listdir(top) if _RANK_DIR.match(n)]
    removed = []
    for directory in dirs:
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if is_temporary(name) and os.path.isfile(path):
                os.unlink(path)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves under %s", len(removed), root)
    return removed
