"""Our exit parts through the checkpoint tools: the exit-vocab conversion (the K most frequent ids of
indexed datasets, ties by id), HF export and back (exit_linear, the estimator and exit_vocab go to
early_exit_heads.safetensors and return bit-exact), resharding, --use-checkpoint-args, and add-exit on a
checkpoint that has them."""

import argparse

import pytest
import torch

from megatron.checkpoint import checkpoint_file, read_file
from megatron.checkpoint.load import load_args_from_checkpoint
from megatron.config import ConfigError, EarlyExitConfig
from megatron.data.indexed_dataset import write_dataset
from megatron.model.state_dict_sharding import full_state_dict_specs
from megatron.testing.checkpoints import run_converter as convert
from megatron.testing.checkpoints import tool_config as cfg_of
from megatron.testing.checkpoints import write_checkpoint as write
from tools.checkpoint import util
from tools.checkpoint.cli import save_megatron
from tools.checkpoint.megatron_io import Layout, ModelCheckpoint, read_megatron
from tools.checkpoint.verify import full_logits

OURS = EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_norm=True, use_exit_linear=True, exit_estimator=True,
                       exit_estimator_hidden=8, exit_vocab_size=5)
IDS = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))


def _datasets(tmp_path):
    """Two datasets: id 7 x5, id 3 x4, ids 1 and 9 x3 (tie), id 50 x2, every other id of 0..11 once."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, [[7, 7, 7, 3, 3, 1, 9], [50, 0, 2]])
    write_dataset(b, [[7, 7, 3, 3, 1, 1, 9, 9, 50], [4, 5, 6, 8, 10, 11]])
    return a, b


def test_exit_vocab_takes_the_most_frequent_ids_of_the_data(tmp_path):
    write(tmp_path / "src", ee=EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_norm=True))
    a, b = _datasets(tmp_path)
    out = convert(tmp_path / "src", tmp_path / "dst", "--conversion-type", "exit-vocab", "--exit-vocab-size", "5",
                  "--data-path", a, b)
    # 7 (5), 3 (4), 1 and 9 (3 each), then 50 (2): sorted ascending.
    assert out.full["exit_vocab"].tolist() == [1, 3, 7, 9, 50] and out.full["exit_vocab"].dtype == torch.int64
    assert out.ee.exit_vocab_size == 5
    for stage in (0, 1):  # both stages own an exit (tp 2 x pp 2): every rank file holds the buffer
        saved = read_file(checkpoint_file(str(tmp_path / "dst"), 1, 1, stage, 2))
        assert saved["model"]["exit_vocab"].tolist() == [1, 3, 7, 9, 50] and saved["args"].exit_vocab_size == 5
    # Ties go to the smaller id: K = 3 keeps 1 over 9.
    three = convert(tmp_path / "src", tmp_path / "three", "--conversion-type", "exit-vocab", "--exit-vocab-size", "3",
                    "--data-path", a, b)
    assert three.full["exit_vocab"].tolist() == [1, 3, 7]
    args = load_args_from_checkpoint(argparse.Namespace(exit_vocab_size=0), str(tmp_path / "dst"))
    assert args.exit_vocab_size == 5


def test_exit_vocab_refusals(tmp_path):
    write(tmp_path / "src", ee=EarlyExitConfig(exit_layer_nums=[2]))
    a, _ = _datasets(tmp_path)
    with pytest.raises(ConfigError, match=r"--exit-vocab-size must lie in 1\.\.60"):
        convert(tmp_path / "src", tmp_path / "x", "--conversion-type", "exit-vocab", "--exit-vocab-size", "61",
                "--data-path", a)
    write_dataset(str(tmp_path / "big"), [[1, 2, 60]])
    with pytest.raises(ConfigError, match="holds token id 60, outside the checkpoint's vocabulary of 60"):
        convert(tmp_path / "src", tmp_path / "y", "--conversion-type", "exit-vocab", "--exit-vocab-size", "4",
                "--data-path", str(tmp_path / "big"))
    with pytest.raises(ConfigError, match="needs --exit-vocab-size K and --data-path"):
        convert(tmp_path / "src", tmp_path / "z", "--conversion-type", "exit-vocab", "--exit-vocab-size", "4")
    write(tmp_path / "plain")
    with pytest.raises(ConfigError, match="has no exits"):
        convert(tmp_path / "plain", tmp_path / "w", "--conversion-type", "exit-vocab", "--exit-vocab-size", "4",
                "--data-path", a)


def _ours(tmp_path):
    full = write(tmp_path / "src", ee=OURS)
    full["exit_vocab"] = torch.tensor([2, 5, 11, 30, 59])
    for k, t in full.items():  # HF keeps no padding rows: zero them as an HF import would
        if t.dim() == 2 and t.shape[0] == 64:
            t[60:] = 0
    save_megatron(str(tmp_path / "ours"), ModelCheckpoint(full, cfg_of("llama"), OURS), Layout(2, 2))
    return full


def _run(loader, saver, src, dst, *extra):
    util.main(["--model-type", "EarlyExitGPT", "--loader", loader, "--saver", saver, "--load-dir", str(src),
               "--save-dir", str(dst), *extra])


def test_hf_export_and_back_carries_the_new_tensors_bit_exactly(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from tools.checkpoint.hf_io import EXIT_HEADS_FILE

    full = _ours(tmp_path)
    _run("megatron", "hf", tmp_path / "ours", tmp_path / "hf")
    heads = load_file(str(tmp_path / "hf" / EXIT_HEADS_FILE))
    new = {k for k in full if "exit_linear" in k or "exit_estimator" in k or k == "exit_vocab"}
    assert len(new) == 2 * 6 + 1 and new <= set(heads)
    assert torch.equal(heads["exit_vocab"], full["exit_vocab"])
    _run("llama_hf", "megatron", tmp_path / "hf", tmp_path / "back", "--target-tensor-parallel-size", "2",
         "--target-pipeline-parallel-size", "2")
    back = read_megatron(str(tmp_path / "back"))
    assert back.ee.use_exit_linear and back.ee.exit_estimator and back.ee.exit_vocab_size == 5
    assert back.full.keys() == full.keys()
    for k, t in full.items():
        assert torch.equal(back.full[k], t) and back.full[k].dtype == t.dtype, k


def test_resharding_carries_the_new_tensors_and_they_compute_the_same(tmp_path):
    full = _ours(tmp_path)
    _run("megatron", "megatron", tmp_path / "ours", tmp_path / "pp4", "--target-tensor-parallel-size", "1",
         "--target-pipeline-parallel-size", "4")
    out = read_megatron(str(tmp_path / "pp4"))
    assert out.full.keys() == full.keys() and all(torch.equal(out.full[k], full[k]) for k in full)
    holders = [s for s in range(4) if "exit_vocab" in read_file(checkpoint_file(str(tmp_path / "pp4"), 1, 0, s, 4))["model"]]
    assert holders == [1, 3]  # the stages owning exits 2 and 4
    logits, exits = full_logits(out.full, out.model, out.ee, IDS)
    ref_logits, ref_exits = full_logits(full, cfg_of("llama"), OURS, IDS)
    assert torch.equal(logits, ref_logits)
    for layer in (2, 4):
        assert torch.equal(exits[layer], ref_exits[layer])


def test_add_exit_gives_new_exits_fresh_parts(tmp_path):
    full = _ours(tmp_path)
    out = convert(tmp_path / "ours", tmp_path / "more", "--add-exit-layer-nums", "3")
    specs = full_state_dict_specs(cfg_of("llama"), out.ee)
    assert out.full.keys() == specs.keys() and out.ee.exit_layer_nums == [2, 3, 4]
    layer3 = "language_model.encoder.layers.2."
    assert not out.full[layer3 + "exit_linear.weight"].any() and not out.full[layer3 + "exit_linear.bias"].any()
    assert out.full[layer3 + "exit_estimator.hidden.weight"].std() > 0
    assert torch.equal(out.full["exit_vocab"], full["exit_vocab"])
    for k, t in full.items():
        assert torch.equal(out.full[k], t), k
