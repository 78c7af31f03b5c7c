"""tools/checkpoint/util.py with Hugging Face directories: tiny random Llama (GQA) / GPT-2 -> ours at tp 2,
pp 2 -> HF is bit-exact, transformers loads the export with the same logits as our model, the weight
formats (safetensors / sharded .bin) are read, and an early-exit model's heads survive the HF round trip."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron.checkpoint import read_file  # noqa: E402
from tools.checkpoint import checkpoint_converter, util  # noqa: E402
from tools.checkpoint.hf_io import EXIT_HEADS_FILE, EXIT_HEADS_JSON, read_hf_state_dict  # noqa: E402
from tools.checkpoint.megatron_io import read_megatron  # noqa: E402
from tools.checkpoint.verify import full_logits  # noqa: E402

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))


def tiny_hf(kind, directory, **save_kw):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=None, eos_token_id=None)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                         bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1: randomise everything so mistakes show
            p.normal_(0, 0.3)
    model.eval().save_pretrained(directory, **save_kw)
    return model


def convert(loader, saver, src, dst, *extra):
    util.main(["--model-type", "EarlyExitGPT", "--loader", loader, "--saver", saver, "--load-dir", str(src),
               "--save-dir", str(dst), *extra])


def hf_logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("loader", ["llama2_hf", "llama_hf"])
def test_llama_gqa_to_tp2_pp2_and_back_is_bit_exact_with_hf_logits(tmp_path, loader):
    hf = tiny_hf("llama", tmp_path / "hf")
    convert(loader, "megatron", tmp_path / "hf", tmp_path / "ours", "--target-tensor-parallel-size", "2",
            "--target-pipeline-parallel-size", "2")
    assert (tmp_path / "ours" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    args = read_file(str(tmp_path / "ours" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"))["args"]
    assert (args.tensor_model_parallel_size, args.num_query_groups, args.group_query_attention) == (2, 2, True)
    ckpt = read_megatron(str(tmp_path / "ours"))
    ours, _ = full_logits(ckpt.full, ckpt.model, ckpt.ee, IDS, pp=2)
    ref = hf_logits(hf)
    torch.testing.assert_close(ours[..., :100], ref, rtol=0, atol=1e-5)
    convert("megatron", "hf", tmp_path / "ours", tmp_path / "back")
    back = read_hf_state_dict(str(tmp_path / "back"))
    original = read_hf_state_dict(str(tmp_path / "hf"))
    assert set(back) == set(original)
    for key in original:
        assert torch.equal(back[key], original[key]), key
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    torch.testing.assert_close(hf_logits(again), ours[..., :100], rtol=0, atol=1e-5)
    assert not (tmp_path / "back" / EXIT_HEADS_JSON).exists()


def test_sharded_bin_weights_and_gpt2_are_read(tmp_path):
    llama = tiny_hf("llama", tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    expected = llama.state_dict()
    (tmp_path / "bin").mkdir()
    keys = sorted(expected)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):  # transformers 5 writes no .bin: shard by hand
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: expected[k] for k in part}, tmp_path / "bin" / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for directory in ("sharded", "bin"):
        got = read_hf_state_dict(str(tmp_path / directory))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in keys)
    gpt2 = tiny_hf("gpt2", tmp_path / "gpt2")
    convert("gpt2_hf", "megatron", tmp_path / "gpt2", tmp_path / "ours", "--target-pipeline-parallel-size", "2")
    ckpt = read_megatron(str(tmp_path / "ours"))
    ours, _ = full_logits(ckpt.full, ckpt.model, ckpt.ee, IDS)
    torch.testing.assert_close(ours[..., :100], hf_logits(gpt2), rtol=0, atol=1e-5)
    convert("megatron", "hf", tmp_path / "ours", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    torch.testing.assert_close(hf_logits(again), hf_logits(gpt2), rtol=0, atol=0)
    with pytest.raises(Exception, match="model_type 'gpt2'; the loader expects 'llama'"):
        convert("llama_hf", "megatron", tmp_path / "gpt2", tmp_path / "x")


def test_early_exit_heads_are_written_beside_the_hf_model_and_read_back(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    convert("llama_hf", "megatron", tmp_path / "hf", tmp_path / "ours", "--target-pipeline-parallel-size", "2")
    checkpoint_converter.main(["--load-dir", str(tmp_path / "ours"), "--save-dir", str(tmp_path / "ee"),
                               "--add-exit-layer-nums", "2", "4", "--use-exit-norm", "--use-exit-mlp",
                               "--random-init"])
    ee_ckpt = read_megatron(str(tmp_path / "ee"))
    convert("megatron", "hf", tmp_path / "ee", tmp_path / "hf_ee")
    meta = json.loads((tmp_path / "hf_ee" / EXIT_HEADS_JSON).read_text())
    assert meta["early_exit"]["exit_layer_nums"] == [2, 4] and meta["padded_vocab_size"] == 100
    assert "language_model.exit_output_layer.4.weight" in meta["tensors"]
    assert (tmp_path / "hf_ee" / EXIT_HEADS_FILE).exists()
    # transformers sees the backbone (trunk MLPs) only: the final logits are the original model's.
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_ee")).eval()
    torch.testing.assert_close(hf_logits(again), hf_logits(hf), rtol=0, atol=1e-5)
    convert("llama_hf", "megatron", tmp_path / "hf_ee", tmp_path / "ours_again", "--target-tensor-parallel-size", "2")
    restored = read_megatron(str(tmp_path / "ours_again"))
    assert restored.ee.exit_layer_nums == [2, 4] and restored.ee.use_exit_mlp
    assert list(restored.full) == list(ee_ckpt.full)
    for key, t in ee_ckpt.full.items():
        assert torch.equal(restored.full[key], t), key
