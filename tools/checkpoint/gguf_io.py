"""Llama-architecture GGUF files (llama.cpp) -> :class:`ModelCheckpoint`, with the tokenizer of the metadata.

Tensors are dequantised with the ``gguf`` package (``pip install gguf``; imported only here), reshaped
to the reversed GGUF shape (GGUF lists the fastest dimension first) and mapped to Hugging Face Llama
names, undoing llama.cpp's q / k rotary permutation (its converter interleaves the two rotary halves of
each head; we and HF rotate halves). The config comes from the ``llama.*`` metadata keys, and the
Hugging Face path (:func:`full_from_hf`) does the rest.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` as a ``tokenizer.json`` (+ ``tokenizer_config.json``
naming bos / eos) for ``--tokenizer-type HuggingFaceTokenizer``: ``llama`` (SentencePiece BPE: merges
ranked by the merged piece's score, byte fallback, the ``▁`` space marker) and ``gpt2`` (byte-level BPE
with the file's merges; the Llama-3 split pattern when ``tokenizer.ggml.pre`` is ``llama-bpe``).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from megatron.checkpoint.layout import CheckpointError
from megatron.config import EarlyExitConfig
from megatron.model.hf_convert import config_from_hf, full_from_hf

from .megatron_io import ModelCheckpoint

__all__ = ["load_gguf", "gguf_tokenizer_files", "permute_rotary", "unpermute_rotary"]

_LAYER_NAMES = {  # GGUF blk.{i}.<name> -> HF model.layers.{i}.<name>
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# Llama 3's pre-tokenizer split (tokenizer.ggml.pre == "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _BYTE = 3, 6  # llama.cpp token types


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("--loader gguf needs the 'gguf' package: pip install gguf") from err
    return gguf


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q / k rows (HF rotate-half -> GGUF interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rotary`."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _hf_config(meta: dict, vocab: int, tied: bool):
    import transformers

    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"GGUF general.architecture is {meta.get('general.architecture')!r}; --loader gguf "
                              "reads the llama architecture only")
    if "llama.rope.scaling.type" in meta and meta["llama.rope.scaling.type"] not in ("none", None):
        raise CheckpointError(f"GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported (plain RoPE)")
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError("GGUF llama.rope.dimension_count differs from the head size: partial rotary is not "
                              "supported by the Llama mapping")
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]), num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(meta["llama.context_length"]),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {name!r} has no place in a Llama model (rope_freqs / other architectures "
                          "are not supported)")


def _hf_state_dict(reader, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    gguf = _import_gguf()
    state = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, kv_heads)
        state[_hf_name(t.name)] = w.contiguous()
    return state


def load_gguf(path: str, *, tp: int = 1, make_vocab_size_divisible_by: int = 1) -> ModelCheckpoint:
    """A Llama GGUF file as a ModelCheckpoint (fp32 weights, iteration 1) with its tokenizer files."""
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--load-dir {path}: cannot read it as a GGUF file ({err})") from err
    meta = _metadata(reader)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; not a Llama GGUF model")
    vocab = int(meta.get("llama.vocab_size", int(embed.shape[1])))
    hf_config = _hf_config(meta, vocab, tied=not any(t.name == "output.weight" for t in reader.tensors))
    state = _hf_state_dict(reader, hf_config.num_attention_heads, hf_config.num_key_value_heads)
    cfg = config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp)
    files = gguf_tokenizer_files(meta) if "tokenizer.ggml.tokens" in meta else {}
    tokenizer = {"tokenizer_type": "HuggingFaceTokenizer"} if files else {}
    return ModelCheckpoint(full_from_hf(state, cfg), cfg, EarlyExitConfig(), tokenizer=tokenizer,
                           tokenizer_files=files)


# ------------------------------------------------------------------------------------------- tokenizer


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a piece into two pieces, the best-scored merged piece first."""
    ranked = []
    for piece, idx in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[idx], idx, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _tokenizer_object(meta: dict):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
        normal = {t: i for t, i in vocab.items() if types[i] not in (_CONTROL, _BYTE)}
        unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
        tok = Tokenizer(models.BPE(vocab, _sentencepiece_merges(normal, scores), unk_token=unk, fuse_unk=True,
                                   byte_fallback=_BYTE in types))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab, merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=meta.get("tokenizer.ggml.pre")
                                              != "llama-bpe")
        tok.pre_tokenizer = byte_level if byte_level.use_regex else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
    else:
        raise CheckpointError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _CONTROL])
    return tok, tokens


def gguf_tokenizer_files(meta: dict) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` rebuilt from GGUF ``tokenizer.ggml.*`` metadata."""
    from tokenizers import processors

    tok, tokens = _tokenizer_object(meta)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name in ("bos", "eos", "unk", "pad"):
        idx = meta.get(f"tokenizer.ggml.{name}_token_id")
        if idx is not None and 0 <= int(idx) < len(tokens):
            config[f"{name}_token"] = tokens[int(idx)]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    if add_bos and "bos_token" in config:
        bos = config["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}
