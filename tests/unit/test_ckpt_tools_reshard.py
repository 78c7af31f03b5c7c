"""tools/checkpoint/util.py megatron -> megatron: resharding is bit-exact and keeps the logits, for early-exit
models with every head variant; the output loads into training; EE-LLM's nested per-rank dicts are read."""

import enum
import os
import sys
import types

import pytest
import torch

from megatron.config import ConfigError, EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.model.early_exit_gpt_model import EarlyExitGPTModel
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import full_state_dict_specs, shard_state_dict
from megatron.checkpoint import CheckpointError, load_checkpoint
from megatron.checkpoint import checkpoint_file, read_file
from megatron.testing.checkpoints import tool_config
from megatron.testing.models import tiny_config
from tools.checkpoint import util
from tools.checkpoint.cli import run_cli, save_megatron
from tools.checkpoint.megatron_io import Layout, ModelCheckpoint, read_megatron
from tools.checkpoint.verify import full_logits


def llama_cfg():
    return tiny_config("llama", num_attention_heads=8, num_query_groups=4, ffn_hidden_size=32, seq_length=8,
                       vocab_size=60, padded_vocab_size=64)


def gpt_cfg():
    return tool_config("gpt")


VARIANTS = [
    ("llama-untied-all-heads", llama_cfg,
     EarlyExitConfig(exit_layer_nums=[1, 2, 4], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True,
                     untie_exit_output_weights=True, exit_layer_weight=[0.5, 1.0, 2.0])),
    ("gpt-tied-all-heads", gpt_cfg,
     EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True)),
    ("llama-pre-norm-block", llama_cfg,
     EarlyExitConfig(exit_layer_nums=[2, 3], use_exit_norm=True, use_exit_block=True, pre_exit=True,
                     untie_exit_output_weights=True)),
    ("gpt-plain-exits", gpt_cfg, EarlyExitConfig(exit_layer_nums=[2])),
]


def random_full(cfg, ee, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s.shape, generator=g) * 0.3 for k, s in full_state_dict_specs(cfg, ee).items()}


def reshard(src, dst, tp, pp, *extra):
    util.main(["--model-type", "EarlyExitGPT", "--loader", "megatron", "--saver", "megatron", "--load-dir", src,
               "--save-dir", dst, "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size",
               str(pp), *extra])


def same_exits(a, b):
    """Equal exit configs (per-exit lists compared as the values they resolve to)."""
    lists = ("exit_layer_weight", "exit_layer_weight_init", "exit_layer_temperature")
    plain = all(getattr(a, f) == getattr(b, f) for f in vars(a) if f not in lists)
    return plain and (a.weights, a.weight_inits, a.temperatures) == (b.weights, b.weight_inits, b.temperatures)


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name,make_cfg,ee", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_reshard_chain_is_bit_exact_and_keeps_logits(tmp_path, name, make_cfg, ee):
    cfg = make_cfg()
    full = random_full(cfg, ee)
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_exits = full_logits(full, cfg, ee, ids)
    assert sorted(ref_exits) == ee.exit_layer_nums and ref_logits.std() > 0.1
    save_megatron(str(tmp_path / "tp2pp2"), ModelCheckpoint(full, cfg, ee), Layout(2, 2))
    src = str(tmp_path / "tp2pp2")
    for tp, pp in ((1, 1), (4, 2), (2, 2)):
        dst = str(tmp_path / f"step-tp{tp}pp{pp}-{len(os.listdir(tmp_path))}")
        reshard(src, dst, tp, pp)
        ckpt = read_megatron(dst)
        assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration) == (tp, pp, 1)
        assert same_exits(ckpt.ee, ee) and ckpt.model.padded_vocab_size == 64
        assert_same(ckpt.full, full)
        logits, exits = full_logits(ckpt.full, ckpt.model, ckpt.ee, ids, pp=pp)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
        for layer in ee.exit_layer_nums:
            torch.testing.assert_close(exits[layer], ref_exits[layer], rtol=0, atol=1e-6)
        src = dst
    # The last step is the first layout again: every rank file holds the same tensors.
    for tp_rank in range(2):
        for stage in range(2):
            first = read_file(checkpoint_file(str(tmp_path / "tp2pp2"), 1, tp_rank, stage, 2))["model"]
            last = read_file(checkpoint_file(src, 1, tp_rank, stage, 2))["model"]
            assert_same(first, last)


def test_resharded_checkpoint_loads_into_training_models(tmp_path):
    cfg, ee = llama_cfg(), VARIANTS[0][2]
    full = random_full(cfg, ee)
    save_megatron(str(tmp_path / "a"), ModelCheckpoint(full, cfg, ee), Layout(2, 2))
    reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1)
    stored = read_file(checkpoint_file(str(tmp_path / "b"), 1, 0, 0, 1))["args"]
    assert (stored.tensor_model_parallel_size, stored.pipeline_model_parallel_size) == (1, 1)
    assert stored.exit_layer_nums == [1, 2, 4] and stored.exit_layer_weight == [0.5, 1.0, 2.0]
    model = EarlyExitGPTModel(cfg, ee, state=ParallelState.single(), initialize=False)
    it = load_checkpoint(str(tmp_path / "b"), [model], None, None, ParallelState.single(), stored, finetune=True)
    assert it == 0
    part = partition(4, 1, 1, ee.exit_layer_nums)
    assert_same(dict(model.state_dict()), shard_state_dict(full, cfg, 1, 0, part, 0, 0, ee))


def test_uneven_split_and_virtual_chunks(tmp_path):
    cfg, ee = gpt_cfg(), VARIANTS[1][2]
    full = random_full(cfg, ee)
    save_megatron(str(tmp_path / "a"), ModelCheckpoint(full, cfg, ee), Layout(1, 2))
    reshard(str(tmp_path / "a"), str(tmp_path / "b"), 2, 2, "--target-layers-per-stage", "2", "2",
            "--target-num-layers-per-virtual-pipeline-stage", "1")
    ckpt = read_megatron(str(tmp_path / "b"))
    assert ckpt.layout == Layout(2, 2, 2, (2, 2))
    assert {"model0", "model1"} <= set(read_file(checkpoint_file(str(tmp_path / "b"), 1, 1, 1, 2)))
    assert_same(ckpt.full, full)
    reshard(str(tmp_path / "b"), str(tmp_path / "c"), 1, 3, "--target-layers-per-stage", "1", "1", "2")
    again = read_megatron(str(tmp_path / "c"))
    assert again.layout == Layout(1, 3, 1, (1, 1, 2))
    assert_same(again.full, full)


class ModelType(enum.Enum):  # pickled as Megatron's megatron.core.enums.ModelType, which we do not have
    encoder_or_decoder = 1


def test_ee_llm_nested_model_dicts_foreign_classes_and_release_are_read(tmp_path, monkeypatch):
    cfg, ee = gpt_cfg(), VARIANTS[3][2]
    full = random_full(cfg, ee)
    save_megatron(str(tmp_path / "a"), ModelCheckpoint(full, cfg, ee, release=True), Layout(1, 2))
    assert (tmp_path / "a" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    fake = types.ModuleType("megatron.core.enums")
    fake.ModelType = ModelType
    monkeypatch.setattr(ModelType, "__module__", "megatron.core.enums")
    monkeypatch.setitem(sys.modules, "megatron.core.enums", fake)
    for stage in range(2):  # rewrite as legacy Megatron's state_dict_for_save_checkpoint nests them
        path = checkpoint_file(str(tmp_path / "a"), 0, 0, stage, 2, release=True)
        ckpt = read_file(path)
        nested = {}
        for key, t in ckpt["model"].items():
            if ".encoder." in key:
                rest = key.split(".encoder.", 1)[1]
                nested.setdefault("language_model", {}).setdefault("encoder", {})[rest] = t
            else:
                node = nested
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = t
        ckpt["model"] = nested
        ckpt["args"].model_type = ModelType.encoder_or_decoder
        torch.save(ckpt, path)
    os.remove(tmp_path / "a" / "release" / "manifest.json")  # the files now are as EE-LLM writes them: unlisted
    monkeypatch.delitem(sys.modules, "megatron.core.enums")
    with pytest.raises(Exception, match="megatron.core.enums"):
        torch.load(path, weights_only=False)
    reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1)
    out = read_megatron(str(tmp_path / "b"))
    assert out.release and (tmp_path / "b" / "release" / "mp_rank_00").is_dir()
    assert_same(out.full, full)


def test_bad_inputs_are_refused_with_the_flag(tmp_path, capsys):
    cfg, ee = gpt_cfg(), VARIANTS[3][2]
    save_megatron(str(tmp_path / "a"), ModelCheckpoint(random_full(cfg, ee), cfg, ee), Layout(2, 2))
    with pytest.raises(ConfigError, match=r"cannot cut the model for --target-tensor-parallel-size 8: .*heads"):
        reshard(str(tmp_path / "a"), str(tmp_path / "b"), 8, 1)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="--layers-per-stage"):
        reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 3)
    with pytest.raises(CheckpointError, match="already holds iter_0000001"):
        reshard(str(tmp_path / "a"), str(tmp_path / "a"), 1, 1)
    with pytest.raises(CheckpointError, match="--load-iteration 3: .*iter_0000003 does not exist"):
        reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1, "--load-iteration", "3")
    os.remove(tmp_path / "a" / "latest_checkpointed_iteration.txt")
    with pytest.raises(CheckpointError, match=r"no latest_checkpointed_iteration.txt; .*found: \[1\]"):
        reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1)
    os.remove(checkpoint_file(str(tmp_path / "a"), 1, 1, 1, 2))
    argv = ["--model-type", "GPT", "--loader", "megatron", "--saver", "megatron", "--load-dir", str(tmp_path / "a"),
            "--save-dir", str(tmp_path / "c"), "--load-iteration", "1"]
    assert run_cli(util.main, argv) == 2
    assert "mp_rank_01_001/model_optim_rng.pt is missing" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--target-tensor-parallel-size", "--target-pipeline-parallel-size",
                                  "--target-num-layers-per-virtual-pipeline-stage", "--make-vocab-size-divisible-by"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_sizes_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        reshard(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1, flag, value)
    assert stop.value.code == 2
    assert f"argument {flag}: must be a positive integer, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_save_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    cfg, ee = gpt_cfg(), VARIANTS[3][2]
    save_megatron(str(tmp_path / "a"), ModelCheckpoint(random_full(cfg, ee), cfg, ee), Layout(1, 1))
    (tmp_path / "file").write_text("not a directory")
    for save_dir in (tmp_path / "file", tmp_path / "file" / "sub"):
        argv = ["--model-type", "GPT", "--loader", "megatron", "--saver", "megatron", "--load-dir", str(tmp_path / "a"),
                "--save-dir", str(save_dir)]
        assert run_cli(util.main, argv) == 2
        err = capsys.readouterr().err
        assert f": error: --save-dir {save_dir} " in err and "a file, not a directory" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "not a directory"
