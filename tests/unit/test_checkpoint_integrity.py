"""Checkpoint integrity in one process: every file's sha256 is recorded at save and checked at load (flipped
bytes that unpickle fine are refused by name), a damaged tracker or manifest gives a clear error, a missing
tracker beside iter_* directories is refused by name, checkpoints without a manifest still load (and say
so), and the temporaries of killed saves are removed by the next save, ours only."""

import hashlib
import json
import logging
import os

import pytest
import torch

from megatron.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, read_tracker, save_checkpoint
from megatron.checkpoint.manifest import MANIFEST_FILE
from megatron.core.parallel_state import ParallelState
from tools.checkpoint.megatron_io import read_megatron

SINGLE = ParallelState.single()


class Args:
    tensor_model_parallel_size = pipeline_model_parallel_size = 1
    consumed_train_samples, consumed_valid_samples = 48, 8


def _save(root, iteration, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(256, 256)  # 256 KiB of weights: the middle of the file is tensor data
    save_checkpoint(str(root), iteration, [model], None, None, SINGLE, Args(), save_rng=False)
    return model


def _load(root, **kw):
    return load_checkpoint(str(root), [torch.nn.Linear(256, 256)], None, None, SINGLE, Args(), no_load_rng=True, **kw)


def test_manifest_records_every_file_and_the_progress(tmp_path):
    _save(tmp_path, 3)
    manifest = json.loads((tmp_path / "iter_0000003" / MANIFEST_FILE).read_text())
    path = checkpoint_file(str(tmp_path), 3, 0, 0, 1)
    data = open(path, "rb").read()
    assert manifest["files"] == {"mp_rank_00/model_optim_rng.pt": {"sha256": hashlib.sha256(data).hexdigest(),
                                                                   "bytes": len(data)}}
    assert manifest["progress"]["consumed_train_samples"] == 48


def test_flipped_bytes_are_refused_naming_the_file_and_the_fix(tmp_path):
    _save(tmp_path, 2, seed=1)
    _save(tmp_path, 4)
    path = checkpoint_file(str(tmp_path), 4, 0, 0, 1)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    open(path, "wb").write(bytes(data))
    torch.load(path, weights_only=False)  # it still unpickles: only the checksum can tell
    with pytest.raises(CheckpointError, match=rf"{path} is truncated or corrupt: .*sha256.*--load-iteration N "
                                              r"\(iterations in .*: \[2, 4\]\)"):
        _load(tmp_path)
    assert _load(tmp_path, load_iteration=2) == 2  # the fix the message names works


def test_damaged_manifest_is_refused(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "iter_0000001" / MANIFEST_FILE).write_bytes(b"\x00\xff{not json")
    with pytest.raises(CheckpointError, match=r"manifest.json is damaged .*--load-iteration N"):
        _load(tmp_path)


def test_binary_tracker_is_a_clear_error(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "latest_checkpointed_iteration.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt holds binary data .*--load-iteration"
                                              r" N \(found: \[1\]\)"):
        read_tracker(str(tmp_path))
    assert _load(tmp_path, load_iteration=1) == 1


def test_missing_tracker_beside_iterations_is_refused_by_name(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 5)
    os.remove(tmp_path / "latest_checkpointed_iteration.txt")
    with pytest.raises(CheckpointError, match=r"--load .* has no latest_checkpointed_iteration.txt; name the "
                                              r"iteration with --load-iteration N \(iterations found: \[2, 5\]"):
        _load(tmp_path)
    # The converter refuses with the same words (one check, shared).
    with pytest.raises(CheckpointError, match=r"--load-dir .* no latest_checkpointed_iteration.txt; .*\[2, 5\]"):
        read_megatron(str(tmp_path))
    assert _load(tmp_path, load_iteration=5) == 5


def test_checkpoints_without_a_manifest_load_and_say_so(tmp_path, caplog):
    model = _save(tmp_path, 1)
    os.remove(tmp_path / "iter_0000001" / MANIFEST_FILE)  # as older versions and EE-LLM write them
    loaded = torch.nn.Linear(256, 256)
    with caplog.at_level(logging.INFO, logger="megatron.checkpoint.manifest"):
        assert load_checkpoint(str(tmp_path), [loaded], None, None, SINGLE, Args(), no_load_rng=True) == 1
    assert torch.equal(loaded.weight, model.weight)
    assert any("has no manifest.json" in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)


def test_a_file_missing_from_the_manifest_is_refused(tmp_path):
    _save(tmp_path, 1)
    manifest = tmp_path / "iter_0000001" / MANIFEST_FILE
    body = json.loads(manifest.read_text())
    body["files"] = {}
    manifest.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="model_optim_rng.pt is not listed in .*manifest.json"):
        _load(tmp_path)


def test_the_next_save_removes_the_temporaries_of_killed_saves_and_nothing_else(tmp_path):
    _save(tmp_path, 1)
    rank_dir = tmp_path / "iter_0000001" / "mp_rank_00"
    ours = [tmp_path / ".latest_checkpointed_iteration.txt.k3j_x9.tmp", rank_dir / ".model_optim_rng.pt.ab12cd.tmp",
            tmp_path / "iter_0000001" / ".manifest.json.zz.tmp", tmp_path / "iter_0000002" / "mp_rank_00" /
            ".distrib_optim.pt.q1.tmp"]
    theirs = [tmp_path / "notes.tmp", rank_dir / ".model_optim_rng.pt.tmp", tmp_path / "data" / ".x.ab.tmp",
              rank_dir / "model_optim_rng.pt.bak"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    _save(tmp_path, 3)
    assert [p.exists() for p in ours] == [False] * len(ours)
    assert [p.exists() for p in theirs] == [True] * len(theirs)
    assert read_tracker(str(tmp_path)) == (3, False) and _load(tmp_path) == 3
