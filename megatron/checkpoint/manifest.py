"""The manifest of a saved iteration, ``iter_XXXXXXX/manifest.json``, and the verified read of a file.

Global rank 0 writes it once every file of the iteration is complete (past the save's barrier), through a
temporary file renamed into place, immediately before it moves the tracker; so a tracker written by us
never points at an iteration without one. It holds:

- ``files``: for every file of the iteration, by path relative to the iteration directory, the sha256 of
  its bytes and its size, as the writer computed them while writing (``sha256sum`` gives the same digest).
  :func:`read_file` checks a file against it before unpickling it, so a flipped byte is refused with the
  file's name and the fix instead of training on damaged state;
- ``progress``: the run's counters at the save (``consumed_train_samples``, ``consumed_valid_samples``,
  ``num_floating_point_operations_so_far``), the one authoritative value for every rank: a partial
  EE-Tuning save copies the stages it did not build from an earlier checkpoint, files whose own ``args``
  carry that run's counters (see ``load.py``).

Checkpoints without a manifest (written before checksums, by EE-LLM / Megatron-LM, or by hand) still load,
unverified; a log line says so once per iteration directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from .layout import CheckpointError, atomic_write, list_iterations, torch_load

__all__ = ["MANIFEST_FILE", "MANIFEST_VERSION", "write_manifest", "read_manifest", "sha256_file", "read_file"]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 16 << 20
_unverified_dirs: set[str] = set()  # iteration directories already reported as unverified (one line each)


def write_manifest(iteration_dir: str, files: dict[str, dict], progress: dict) -> None:
    """Write ``iteration_dir``'s manifest: ``files`` maps a path relative to it to ``{"sha256", "bytes"}``."""
    body = {"version": MANIFEST_VERSION, "files": dict(sorted(files.items())), "progress": progress}
    text = json.dumps(body, indent=1, sort_keys=True).encode()
    atomic_write(os.path.join(iteration_dir, MANIFEST_FILE), lambda f: f.write(text))


def read_manifest(iteration_dir: str) -> dict | None:
    """The manifest of ``iteration_dir``, or ``None`` when it has none; a damaged one is refused."""
    path = os.path.join(iteration_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
        if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); load an earlier iteration with --load-iteration N, or "
                              "delete the file to load this one unverified") from None
    return body


def sha256_file(path: str) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _verify(path: str) -> None:
    rank_dir = os.path.dirname(os.path.abspath(path))
    iteration_dir = os.path.dirname(rank_dir)
    manifest = read_manifest(iteration_dir)
    if manifest is None:
        if iteration_dir not in _unverified_dirs:
            _unverified_dirs.add(iteration_dir)
            log.info("%s has no %s (saved before checksums, or by EE-LLM / Megatron-LM): its files load "
                     "unverified", iteration_dir, MANIFEST_FILE)
        return
    root = os.path.dirname(iteration_dir)
    fix = f"load an earlier iteration with --load-iteration N (iterations in {root}: {list_iterations(root)})"
    relative = os.path.relpath(os.path.abspath(path), iteration_dir)
    want = manifest["files"].get(relative)
    if want is None:
        raise CheckpointError(f"checkpoint file {path} is not listed in {os.path.join(iteration_dir, MANIFEST_FILE)}"
                              f" (added or renamed after the save?); {fix}")
    digest, size = sha256_file(path)
    if (digest, size) != (want.get("sha256"), want.get("bytes")):
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {size} bytes with sha256 {digest}, "
                              f"but the save recorded {want.get('bytes')} bytes with sha256 {want.get('sha256')}; "
                              f"{fix}")


def read_file(path: str) -> dict:
    """A checkpoint file's dict, checked against its iteration's manifest first (see the module doc)."""
    if os.path.isfile(path):
        _verify(path)
    return torch_load(path)
