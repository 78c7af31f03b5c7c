"""Hugging Face Llama / GPT-2 <-> our FULL state dict (see state_dict_sharding), and their configs.

Tensor mapping (that of Megatron's ``tools/checkpoint/loader_llama2_hf.py``, which EE-LLM uses unchanged):
- Llama: ``embed_tokens`` -> word embedding, ``model.norm`` -> final norm, ``lm_head`` -> output layer
  (untied only), ``input_layernorm`` / ``post_attention_layernorm`` -> ``input_norm`` /
  ``post_attention_norm``, ``q/k/v_proj`` -> grouped ``query_key_value`` (per KV group: the group's query
  heads, then its key head, then its value head; no rotary permutation: both sides rotate halves),
  ``o_proj`` -> ``dense``, ``[gate_proj; up_proj]`` -> ``dense_h_to_4h``, ``down_proj`` -> ``dense_4h_to_h``.
- GPT-2: ``Conv1D`` weights are stored ``[in, out]`` and are transposed; ``c_attn`` is ``[q | k | v]`` over
  all heads and is regrouped per head (``[q_h, k_h, v_h]``: multi-head attention is one group per head);
  ``wpe`` -> position embeddings; ``ln_1`` / ``ln_2`` / ``ln_f`` -> the LayerNorms.
- Vocab: going to ours the word embedding / output layer get zero rows up to ``padded_vocab_size``;
  going back they are cut to ``vocab_size``.
- Exits: an early-exit model exported to HF returns, beside the HF state dict, an ``exits`` dict holding
  every tensor HF has no place for (``exit_norm``, ``mlp.branch``, ``exit_block``, untied
  ``exit_output_layer``) under its FULL key name; for exit-MLP layers the trunk MLP is the HF MLP. Giving
  that dict back to :func:`full_from_hf` restores the early-exit model bit for bit.

A tied HF model lists the shared table under both ``...embed_tokens`` / ``wte`` and ``lm_head`` (as
``model.state_dict()`` does); :func:`hf_from_full` returns both, as the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.core.tensor_parallel.utils import pad_vocab_size
from megatron.model.state_dict_sharding import (
    EMBEDDING_KEY,
    FINAL_NORM_PREFIX,
    OUTPUT_LAYER_KEY,
    POSITION_KEY,
    StateDictError,
    check_full_state_dict,
    layer_key,
    model_arch,
)

__all__ = ["HFExport", "hf_family", "config_from_hf", "hf_config_from", "full_from_hf", "hf_from_full"]

# Non-persistent buffers some transformers versions list in state_dict(); derived from the config.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "attn.bias", "attn.masked_bias")


@dataclass
class HFExport:
    """An HF state dict plus the early-exit tensors it cannot hold (FULL key names; empty for a plain GPT)."""

    state_dict: dict[str, torch.Tensor]
    exits: dict[str, torch.Tensor]


def hf_family(cfg: ModelConfig) -> str:
    """'llama' or 'gpt2': the Hugging Face architecture that computes the same function as ``cfg``."""
    if cfg.position_embedding_type == "rope" and cfg.normalization == "RMSNorm" and cfg.swiglu:
        if cfg.rotary_percent != 1.0:
            raise ConfigError(f"--rotary-percent {cfg.rotary_percent}: Hugging Face Llama rotates the whole head")
        return "llama"
    if (cfg.position_embedding_type == "learned_absolute" and cfg.normalization == "LayerNorm"
            and not cfg.swiglu and cfg.add_bias_linear and cfg.query_groups == cfg.num_attention_heads):
        return "gpt2"
    raise ConfigError(
        "no Hugging Face architecture matches this model: Llama needs --position-embedding-type rope "
        "--normalization RMSNorm --swiglu; GPT-2 needs learned_absolute positions, LayerNorm, GELU, linear "
        "biases and no --group-query-attention"
    )


# ------------------------------------------------------------------------------------------------ configs


def _llama_fields(hf: Any) -> dict[str, Any]:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ConfigError(f"Llama hidden_act {hf.hidden_act!r}: only silu (SwiGLU, --swiglu) is supported")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"Llama rope scaling {rope!r} is not supported: only plain RoPE (rope_type default)")
    attn_bias, mlp_bias = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConfigError(
            f"Llama attention_bias={attn_bias} with mlp_bias={mlp_bias}: --add-bias-linear covers every linear "
            "layer, so both must be equal"
        )
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        normalization="RMSNorm",
        norm_epsilon=hf.rms_norm_eps,
        swiglu=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        add_bias_linear=attn_bias,
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0)),
        hidden_dropout=0.0,
    )


# Our MLP's GELU is the tanh approximation (Megatron's fused bias-GELU; what GPT-2 was trained with).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _gpt2_fields(hf: Any) -> dict[str, Any]:
    unsupported = [
        ("activation_function", hf.activation_function not in _TANH_GELUS),
        ("scale_attn_by_inverse_layer_idx", bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False))),
        ("scale_attn_weights", not getattr(hf, "scale_attn_weights", True)),
        ("add_cross_attention", bool(getattr(hf, "add_cross_attention", False))),
    ]
    for name, bad in unsupported:
        if bad:
            raise ConfigError(
                f"GPT-2 {name}={getattr(hf, name)!r} has no equivalent here (supported: activation_function "
                f"{' / '.join(_TANH_GELUS)} (tanh GELU), scaled attention, no cross attention)"
            )
    return dict(
        num_layers=hf.n_layer,
        hidden_size=hf.n_embd,
        num_attention_heads=hf.n_head,
        num_query_groups=None,
        kv_channels=None,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd,
        max_position_embeddings=hf.n_positions,
        normalization="LayerNorm",
        norm_epsilon=hf.layer_norm_epsilon,
        swiglu=False,
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
        attention_dropout=float(hf.attn_pdrop),
        hidden_dropout=float(hf.resid_pdrop),
    )


def config_from_hf(hf_config: Any, *, make_vocab_size_divisible_by: int = 1, tp: int = 1,
                   seq_length: int | None = None) -> ModelConfig:
    """The ModelConfig computing the same function as a transformers LlamaConfig / GPT2Config.

    The vocab is padded to a multiple of ``make_vocab_size_divisible_by * tp`` (1: no padding, as EE-LLM's
    Llama loader); ``seq_length`` defaults to the model's maximum positions."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "llama":
        values = _llama_fields(hf_config)
    elif model_type == "gpt2":
        values = _gpt2_fields(hf_config)
    else:
        raise ConfigError(f"Hugging Face model_type {model_type!r} is not supported (llama, gpt2)")
    values.update(
        seq_length=seq_length or values["max_position_embeddings"],
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=pad_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        untie_embeddings_and_output_weights=not getattr(hf_config, "tie_word_embeddings", True),
        apply_query_key_layer_scaling=False,
    )
    return ModelConfig(**values).validate(tp)


def hf_config_from(cfg: ModelConfig) -> Any:
    """A transformers LlamaConfig / GPT2Config describing the same model (exits are not part of it)."""
    import transformers

    tied = not cfg.untie_embeddings_and_output_weights
    if hf_family(cfg) == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_epsilon,
            rope_theta=float(cfg.rotary_base),
            attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear,
            attention_dropout=cfg.attention_dropout, tie_word_embeddings=tied, hidden_act="silu",
            bos_token_id=None, eos_token_id=None,
        )
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=cfg.ffn_size, n_positions=cfg.max_positions,
        layer_norm_epsilon=cfg.norm_epsilon, attn_pdrop=cfg.attention_dropout, resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout, tie_word_embeddings=tied,
        activation_function="gelu_new",
        bos_token_id=None, eos_token_id=None,
    )


# ------------------------------------------------------------------------------------------ tensor rules


@dataclass(frozen=True)
class _Rule:
    """One FULL tensor made of (or split into) the listed HF tensors, both directions exact."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Any  # Callable[[list[Tensor]], Tensor]
    to_hf: Any  # Callable[[Tensor], list[Tensor]]


def _same(ts):
    return ts[0]


def _one(t):
    return [t]


def _t_in(ts):
    return ts[0].t().contiguous()


def _t_out(t):
    return [t.t().contiguous()]


_PLAIN, _CONV1D = (_same, _one), (_t_in, _t_out)


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[all q heads], [all k heads], [all v heads] -> per group [q heads of the group, k head, v head]."""
    parts = [x.reshape(groups, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def _ungroup_qkv(qkv: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    rows = qkv.shape[0] // (heads + 2 * groups)  # kv_channels
    per_group = qkv.reshape(groups, -1, *qkv.shape[1:])
    q, k, v = per_group.split([heads // groups * rows, rows, rows], dim=1)
    return [x.reshape(-1, *qkv.shape[1:]).clone() for x in (q, k, v)]


def _linear_rules(a, ours: str, hf: str, weight, bias) -> list[_Rule]:
    """``ours.weight`` from ``hf.weight`` (and the biases when the model has them) with the given transforms."""
    rules = [_Rule(f"{ours}.weight", tuple(f"{h}.weight" for h in hf.split("|")), *weight)]
    if a.bias:
        rules.append(_Rule(f"{ours}.bias", tuple(f"{h}.bias" for h in hf.split("|")), *bias))
    return rules


def _llama_layer(a, p: str) -> list[_Rule]:
    qkv = (lambda ts: _group_qkv(*ts, a.groups), lambda t: _ungroup_qkv(t, a.heads, a.groups))
    gate_up = (lambda ts: torch.cat(ts), lambda t: [x.clone() for x in t.chunk(2)])
    plain = _PLAIN
    attn, mlp = f"{p}self_attn.", f"{p}mlp."
    return [
        _Rule("input_norm.weight", (f"{p}input_layernorm.weight",), *plain),
        *_linear_rules(a, "self_attention.query_key_value", f"{attn}q_proj|{attn}k_proj|{attn}v_proj", qkv, qkv),
        *_linear_rules(a, "self_attention.dense", f"{attn}o_proj", plain, plain),
        _Rule("post_attention_norm.weight", (f"{p}post_attention_layernorm.weight",), *plain),
        *_linear_rules(a, "mlp.dense_h_to_4h", f"{mlp}gate_proj|{mlp}up_proj", gate_up, gate_up),
        *_linear_rules(a, "mlp.dense_4h_to_h", f"{mlp}down_proj", plain, plain),
    ]


def _gpt2_layer(a, p: str) -> list[_Rule]:
    h = a.heads
    # c_attn's output columns are [q | k | v]: one "group" per head regroups them as [q_h, k_h, v_h].
    qkv_w = (lambda ts: _group_qkv(*ts[0].t().chunk(3), h),
             lambda t: [torch.cat(_ungroup_qkv(t, h, h)).t().contiguous()])
    qkv_b = (lambda ts: _group_qkv(*ts[0].chunk(3), h), lambda t: [torch.cat(_ungroup_qkv(t, h, h))])
    conv, plain = _CONV1D, _PLAIN
    return [
        _Rule("input_norm.weight", (f"{p}ln_1.weight",), *plain),
        _Rule("input_norm.bias", (f"{p}ln_1.bias",), *plain),
        *_linear_rules(a, "self_attention.query_key_value", f"{p}attn.c_attn", qkv_w, qkv_b),
        *_linear_rules(a, "self_attention.dense", f"{p}attn.c_proj", conv, plain),
        _Rule("post_attention_norm.weight", (f"{p}ln_2.weight",), *plain),
        _Rule("post_attention_norm.bias", (f"{p}ln_2.bias",), *plain),
        *_linear_rules(a, "mlp.dense_h_to_4h", f"{p}mlp.c_fc", conv, plain),
        *_linear_rules(a, "mlp.dense_4h_to_h", f"{p}mlp.c_proj", conv, plain),
    ]


def _vocab_rows(vocab: int, padded: int):
    if padded < vocab:
        raise ConfigError(f"padded_vocab_size ({padded}) is smaller than vocab_size ({vocab}); raise it")

    def pad(ts):
        t = ts[0]
        if t.shape[0] != vocab:
            raise StateDictError(f"the HF word embedding / lm_head has {t.shape[0]} rows but vocab_size is {vocab}; "
                                 "build the config from this model's HF config (config_from_hf)")
        return torch.cat([t, t.new_zeros(padded - vocab, *t.shape[1:])])

    return pad, lambda t: [t[:vocab].clone()]


def _rules(cfg: ModelConfig, a) -> list[_Rule]:
    """Every FULL backbone tensor with its HF source; exit-MLP layers' trunk is HF's MLP."""
    vocab = _vocab_rows(cfg.vocab_size, a.padded_vocab)
    plain = _PLAIN
    if hf_family(cfg) == "llama":
        top = [_Rule(EMBEDDING_KEY, ("model.embed_tokens.weight",), *vocab),
               _Rule(f"{FINAL_NORM_PREFIX}weight", ("model.norm.weight",), *plain)]
        layer, prefix = _llama_layer, "model.layers.{}."
    else:
        top = [_Rule(EMBEDDING_KEY, ("transformer.wte.weight",), *vocab),
               _Rule(POSITION_KEY, ("transformer.wpe.weight",), *plain),
               _Rule(f"{FINAL_NORM_PREFIX}weight", ("transformer.ln_f.weight",), *plain),
               _Rule(f"{FINAL_NORM_PREFIX}bias", ("transformer.ln_f.bias",), *plain)]
        layer, prefix = _gpt2_layer, "transformer.h.{}."
    if not a.tied_embeddings:
        top.append(_Rule(OUTPUT_LAYER_KEY, ("lm_head.weight",), *vocab))
    rules = list(top)
    for j in range(a.num_layers):
        trunk = a.exit_mlp and (j + 1) in a.exits
        for r in layer(a, prefix.format(j)):
            ours = "mlp.trunk." + r.ours[4:] if trunk and r.ours.startswith("mlp.") else r.ours
            rules.append(_Rule(layer_key(j, ours), r.hf, r.to_ours, r.to_hf))
    return rules


def _embed_hf_key(cfg: ModelConfig) -> str:
    return "model.embed_tokens.weight" if hf_family(cfg) == "llama" else "transformer.wte.weight"


# ------------------------------------------------------------------------------------------- conversions


def full_from_hf(hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, ee: EarlyExitConfig | None = None,
                 exits: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our FULL state dict from a LlamaForCausalLM / GPT2LMHeadModel state dict (plus exit tensors).

    ``exits``: the :class:`HFExport` ``exits`` dict of an early-exit model (FULL key names)."""
    a = model_arch(cfg, ee)
    rest = dict(hf_state_dict)

    def take(key: str) -> torch.Tensor:
        if key not in rest:
            raise StateDictError(f"Hugging Face state dict has no {key!r}; is it a {hf_family(cfg)} model "
                                 "with the configured number of layers and biases?")
        return rest.pop(key)

    full = {rule.ours: rule.to_ours([take(k) for k in rule.hf]) for rule in _rules(cfg, a)}
    if a.tied_embeddings and "lm_head.weight" in rest:
        head = rest.pop("lm_head.weight")
        if not torch.equal(head, hf_state_dict[_embed_hf_key(cfg)]):
            raise StateDictError("lm_head.weight differs from the word embedding but the model is tied; "
                                 "set --untie-embeddings-and-output-weights (tie_word_embeddings=False)")
    leftover = [k for k in rest if not k.endswith(_IGNORED_HF_SUFFIXES)]
    if leftover:
        raise StateDictError(f"unexpected Hugging Face keys {sorted(leftover)[:6]}: the configuration does "
                             "not describe this model (layers, biases, tied embeddings?)")
    clash = sorted(set(exits or {}) & set(full))
    if clash:
        raise StateDictError(f"exits dict holds backbone tensors {clash[:6]}: give only the HFExport.exits tensors")
    full.update(exits or {})
    specs = check_full_state_dict(full, cfg, ee)
    return {key: full[key] for key in specs}


def hf_from_full(full: Mapping[str, torch.Tensor], cfg: ModelConfig, ee: EarlyExitConfig | None = None) -> HFExport:
    """A LlamaForCausalLM / GPT2LMHeadModel state dict from our FULL dict, plus the exit tensors."""
    specs = check_full_state_dict(full, cfg, ee)
    a = model_arch(cfg, ee)
    rest = dict(full)
    hf: dict[str, torch.Tensor] = {}
    for rule in _rules(cfg, a):
        hf.update(zip(rule.hf, rule.to_hf(rest.pop(rule.ours))))
    if a.tied_embeddings:
        hf["lm_head.weight"] = hf[_embed_hf_key(cfg)]
    return HFExport(hf, {key: rest[key] for key in specs if key in rest})
