"""tools/checkpoint/checkpoint_converter.py: add-exit (copy / seeded random initialisation, tied or untied, on a
plain checkpoint at tp 2 x pp 2) and exit-position (every exit tensor moves; each exit computes the same)."""

import os
import subprocess
import sys

import pytest
import torch

from megatron.config import ConfigError, EarlyExitConfig
from megatron.checkpoint import checkpoint_file, read_file
from megatron.testing.checkpoints import run_converter as convert
from megatron.testing.checkpoints import tool_config as cfg_of
from megatron.testing.checkpoints import write_checkpoint as write
from tools.checkpoint import checkpoint_converter
from tools.checkpoint.megatron_io import Layout
from tools.checkpoint.verify import full_logits

L = "language_model.encoder.layers.{}."
IDS = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_copy_initialised_norm_exit_at_the_last_layer_equals_the_final_head(tmp_path, kind):
    full = write(tmp_path / "plain", kind)
    out = convert(tmp_path / "plain", tmp_path / "ee", "--add-exit-layer-nums", "2", "4", "--use-exit-norm")
    assert out.layout == Layout(2, 2) and out.ee.exit_layer_nums == [2, 4] and out.ee.untie_exit_output_weights
    for key, t in full.items():
        assert torch.equal(out.full[key], t), key  # the backbone is untouched
    logits, exits = full_logits(out.full, out.model, out.ee, IDS)
    torch.testing.assert_close(exits[4], logits, rtol=0, atol=0)
    assert (exits[2] - logits).abs().max() > 1e-2
    stored = read_file(checkpoint_file(str(tmp_path / "ee"), 1, 1, 1, 2))["args"]
    assert stored.exit_layer_nums == [2, 4] and stored.use_exit_norm and stored.untie_exit_output_weights


def test_copy_initialisation_of_mlp_block_and_projection(tmp_path):
    write(tmp_path / "plain", "gpt")
    out = convert(tmp_path / "plain", tmp_path / "ee", "--add-exit-layer-nums", "1", "3", "--use-exit-mlp",
                  "--use-exit-block", "--use-exit-norm")
    f = out.full
    for layer in (0, 2):
        for part in ("dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias"):
            assert torch.equal(f[L.format(layer) + f"mlp.branch.{part}"], f[L.format(layer) + f"mlp.trunk.{part}"])
        for part in ("input_norm.bias", "self_attention.query_key_value.bias", "mlp.dense_4h_to_h.weight"):
            assert torch.equal(f[L.format(layer) + f"exit_block.{part}"], f[L.format(3) + part])
        assert torch.equal(f[L.format(layer) + "exit_norm.bias"], f["language_model.encoder.final_norm.bias"])
    assert torch.equal(f["language_model.exit_output_layer.3.weight"],
                       f["language_model.embedding.word_embeddings.weight"])  # tied embeddings: the embedding


def test_random_initialisation_is_reproducible_by_seed_and_tp_consistent(tmp_path):
    write(tmp_path / "plain")
    flags = ["--add-exit-layer-nums", "1", "3", "--use-exit-mlp", "--use-exit-block", "--use-exit-norm",
             "--random-init", "--init-method-std", "0.05"]
    a = convert(tmp_path / "plain", tmp_path / "a", *flags, "--seed", "7")
    b = convert(tmp_path / "plain", tmp_path / "b", *flags, "--seed", "7")
    c = convert(tmp_path / "plain", tmp_path / "c", *flags, "--seed", "8")
    new = [k for k in a.full if "exit" in k or "branch" in k]
    assert all(torch.equal(a.full[k], b.full[k]) for k in a.full)  # merge_state_dicts also checked tp copies
    random_keys = [k for k in new if k.endswith(("query_key_value.weight", "exit_output_layer.1.weight"))]
    assert random_keys and all(not torch.equal(a.full[k], c.full[k]) for k in random_keys)
    assert torch.equal(a.full[L.format(0) + "exit_norm.weight"], torch.ones(32))
    std = a.full["language_model.exit_output_layer.3.weight"].std().item()
    assert 0.04 < std < 0.06
    branch = a.full[L.format(2) + "mlp.branch.dense_4h_to_h.weight"]
    assert branch.std().item() < 0.05 / 2  # scaled init: std / sqrt(2 num_layers)


def test_tied_exits_and_adding_to_existing_exits(tmp_path):
    write(tmp_path / "plain")
    tied = convert(tmp_path / "plain", tmp_path / "tied", "--add-exit-layer-nums", "2", "--tie-exit-output-weights")
    assert not tied.ee.untie_exit_output_weights and not any("exit_output_layer" in k for k in tied.full)
    # Adding an MLP exit to a checkpoint with plain tied exits: the old exit gets an MLP too and, untied,
    # a copy of the shared projection (so it still computes what it did).
    more = convert(tmp_path / "tied", tmp_path / "more", "--add-exit-layer-nums", "4", "--use-exit-mlp",
                   "--untie-exit-output-weights")
    assert more.ee.exit_layer_nums == [2, 4] and more.ee.use_exit_mlp
    _, before = full_logits(tied.full, tied.model, tied.ee, IDS)
    _, after = full_logits(more.full, more.model, more.ee, IDS)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="would drop the checkpoint's own exit projections"):
        convert(tmp_path / "more", tmp_path / "x", "--add-exit-layer-nums", "1", "--tie-exit-output-weights")
    with pytest.raises(ConfigError, match="move them first with --conversion-type exit-position"):
        convert(tmp_path / "more", tmp_path / "x", "--add-exit-layer-nums", "1", "--target-exit-position", "pre")
    with pytest.raises(ConfigError, match="--add-exit-layer-nums must name layers in 1..4"):
        convert(tmp_path / "more", tmp_path / "x", "--add-exit-layer-nums", "5")


def test_exit_position_round_trip_moves_every_exit_tensor_and_keeps_each_exit(tmp_path):
    ee = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_block=True,
                         untie_exit_output_weights=True, exit_layer_weight=[0.25, 1.0])
    full = write(tmp_path / "post", "gpt", ee)
    pre = convert(tmp_path / "post", tmp_path / "pre", "--conversion-type", "exit-position",
                  "--target-exit-position", "pre")
    assert pre.ee.exit_layer_nums == [2, 4] and pre.ee.pre_exit and pre.ee.exit_layer_weight == [0.25, 1.0]
    # Exit 3 (stage 1, local layer 0) became exit 4 (stage 1, local layer 1): its block moved there.
    assert torch.equal(pre.full[L.format(3) + "exit_block.self_attention.dense.weight"],
                       full[L.format(2) + "exit_block.self_attention.dense.weight"])
    assert torch.equal(pre.full["language_model.exit_output_layer.2.weight"],
                       full["language_model.exit_output_layer.1.weight"])
    stage1 = read_file(checkpoint_file(str(tmp_path / "pre"), 1, 0, 1, 2))["model"]
    assert "language_model.encoder.layers.1.exit_norm.weight" in stage1
    _, post_exits = full_logits(full, cfg_of("gpt"), ee, IDS)
    _, pre_exits = full_logits(pre.full, pre.model, pre.ee, IDS)
    for layer in (1, 3):
        torch.testing.assert_close(pre_exits[layer + 1], post_exits[layer], rtol=0, atol=1e-6)
    back = convert(tmp_path / "pre", tmp_path / "back", "--conversion-type", "exit-position")  # flips by default
    assert back.ee.exit_layer_nums == [1, 3] and not back.ee.pre_exit
    assert list(back.full) == list(full) and all(torch.equal(back.full[k], full[k]) for k in full)
    with pytest.raises(ConfigError, match="already post exits"):
        convert(tmp_path / "back", tmp_path / "x", "--conversion-type", "exit-position", "--target-exit-position",
                "post")


def test_exit_position_refuses_what_has_no_equivalent(tmp_path):
    write(tmp_path / "mlp", "llama", EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True))
    with pytest.raises(ConfigError, match="exist only as post exits"):
        convert(tmp_path / "mlp", tmp_path / "x", "--conversion-type", "exit-position")
    write(tmp_path / "last", "llama", EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_norm=True))
    with pytest.raises(ConfigError, match=r"exits at layers \[4\] would move after the last layer"):
        convert(tmp_path / "last", tmp_path / "x", "--conversion-type", "exit-position")


def test_script_runs_from_anywhere_and_reports_bad_flags(tmp_path):
    write(tmp_path / "plain")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint", "checkpoint_converter.py")
    argv = [sys.executable, script, "--load-dir", str(tmp_path / "plain"), "--load-iteration", "1",
            "--megatron-path", "/unused", "--save-dir", str(tmp_path / "x"), "--add-exit-layer-nums", "9"]
    bad = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "error: --add-exit-layer-nums must name layers in 1..4" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_add_exit_layers_script_templates_use_existing_flags():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "ee_tuning", "add_exit_layers.sh")
    with open(script) as f:
        text = f.read().replace("\\\n#", "").replace("\\\n", "")
    commands = [line.split("$CONVERTER", 1)[1] for line in text.splitlines() if "$CONVERTER --save-dir" in line]
    assert len(commands) == 8  # EE-LLM's 13B (4 with 8 exits, 2 with one), 70B and 7B variants
    for command in commands:
        flags = command.replace("$SAVE_DIR", "out").split()
        args = checkpoint_converter.build_parser().parse_args(["--load-dir", "in", *flags])
        assert len(args.add_exit_layer_nums) in (1, 8)
