"""tools/checkpoint/util.py --loader gguf: a tiny GGUF file written here with gguf.GGUFWriter the way llama.cpp
converts a Hugging Face Llama (F32 tensors, q / k rows permuted, tokenizer in the metadata) loads back to
a model with HF's logits, and its tokenizer is rebuilt for --tokenizer-type HuggingFaceTokenizer."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from megatron.tokenizer.huggingface import HuggingFaceTokenizer  # noqa: E402
from megatron.checkpoint import read_file  # noqa: E402
from tools.checkpoint import util  # noqa: E402
from tools.checkpoint.gguf_io import permute_rotary, unpermute_rotary  # noqa: E402
from tools.checkpoint.megatron_io import read_megatron  # noqa: E402
from tools.checkpoint.verify import full_logits  # noqa: E402

_PIECES = [("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("▁h", -3.0), ("ll", -3.0),
           ("he", -4.0), ("llo", -4.0), ("▁he", -5.0), ("▁hello", -6.0)]
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def vocabulary():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in _PIECES]
    scores = [0.0] * 259 + [s for _, s in _PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES)
    return tokens, scores, types


def gguf_name(hf_name):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


# Quantised as llama.cpp does for some tensors: the loader must dequantise them.
QUANTISED = {"blk.0.ffn_gate.weight": "Q8_0", "blk.1.attn_output.weight": "F16"}


def write_gguf(path, model, tokens, scores, types):
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    for name, t in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            t = permute_rotary(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute_rotary(t, c.num_key_value_heads)
        name, values = gguf_name(name), t.numpy().astype(np.float32)
        if QUANTISED.get(name) == "Q8_0":
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, values.astype(np.float16) if name in QUANTISED else values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_rotary_permutation_is_undone():
    w = torch.arange(8 * 4 * 3.0).reshape(32, 3)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert not torch.equal(permute_rotary(w, 4), w)


def test_gguf_llama_gives_hf_logits_and_its_tokenizer(tmp_path):
    tokens, scores, types = vocabulary()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        # What llama.cpp keeps of the quantised tensors is what HF must compute with.
        gate = hf.model.layers[0].mlp.gate_proj.weight
        qtype = gguf.GGMLQuantizationType.Q8_0
        gate.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(gate.numpy(), qtype), qtype)))
        dense = hf.model.layers[1].self_attn.o_proj.weight
        dense.copy_(dense.half().float())
    write_gguf(tmp_path / "tiny.gguf", hf, tokens, scores, types)
    util.main(["--model-type", "GPT", "--loader", "gguf", "--saver", "megatron", "--load-dir",
               str(tmp_path / "tiny.gguf"), "--save-dir", str(tmp_path / "ours"), "--target-tensor-parallel-size", "2"])
    ckpt = read_megatron(str(tmp_path / "ours"))
    ids_model = torch.randint(0, len(tokens), (2, 9), generator=torch.Generator().manual_seed(2))
    ours, _ = full_logits(ckpt.full, ckpt.model, ckpt.ee, ids_model)
    with torch.no_grad():
        ref = hf(ids_model).logits
    torch.testing.assert_close(ours[..., :len(tokens)], ref, rtol=0, atol=1e-5)
    args = read_file(str(tmp_path / "ours" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"))["args"]
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    tok = HuggingFaceTokenizer(args.tokenizer_model)
    ids = tok.tokenize("hello world")
    assert ids[:2] == [1, tokens.index("▁hello")] and tok.eod == 2
    assert tokens.index("<0x77>") in ids  # 'w' is not a piece: byte fallback
    assert tok.detokenize(ids, skip_special_tokens=True) == "hello world"
    # The HF export carries the rebuilt tokenizer; transformers loads both.
    util.main(["--model-type", "GPT", "--loader", "gguf", "--saver", "hf", "--load-dir", str(tmp_path / "tiny.gguf"),
               "--save-dir", str(tmp_path / "hf")])
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("hello").input_ids == ids[:2]
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids_model).logits, ref, rtol=0, atol=1e-5)
