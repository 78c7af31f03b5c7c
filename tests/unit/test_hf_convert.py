"""Hugging Face Llama / GPT-2 <-> our FULL state dict: exact round trips, layouts, configs and errors.

Tiny models with random weights built from transformers configs (no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron.config import ConfigError, EarlyExitConfig  # noqa: E402
from megatron.model.hf_convert import config_from_hf, full_from_hf, hf_config_from, hf_from_full  # noqa: E402
from megatron.model.partition import partition  # noqa: E402
from megatron.model.state_dict_sharding import (  # noqa: E402
    StateDictError,
    full_state_dict_specs,
    merge_state_dicts,
    shard_state_dict,
)

QKV = "language_model.encoder.layers.{}.self_attention.query_key_value.{}"


def llama_config(**kw):
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=None,
                eos_token_id=None)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def gpt2_config(**kw):
    base = dict(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return transformers.GPT2Config(**base)


def hf_state(hf_config, model_cls, seed=0):
    torch.manual_seed(seed)
    model = model_cls(hf_config)
    with torch.no_grad():  # biases and norms start at 0 / 1: randomise them so layouts are visible
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.state_dict()


def assert_same(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=True), dict(attention_bias=True, mlp_bias=True)],
                         ids=["untied", "tied", "bias"])
def test_llama_round_trip_is_bit_exact(kw):
    hf_cfg = llama_config(**kw)
    sd = hf_state(hf_cfg, transformers.LlamaForCausalLM)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)
    full = full_from_hf(sd, cfg)
    assert list(full) == list(full_state_dict_specs(cfg))
    export = hf_from_full(full, cfg)
    assert export.exits == {}
    assert_same(export.state_dict, sd)


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_round_trip_is_bit_exact(tied):
    hf_cfg = gpt2_config(tie_word_embeddings=tied)
    sd = hf_state(hf_cfg, transformers.GPT2LMHeadModel)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)
    assert_same(hf_from_full(full_from_hf(sd, cfg), cfg).state_dict, sd)


def test_llama_qkv_is_grouped_and_vocab_padded_with_zeros():
    hf_cfg = llama_config(attention_bias=True, mlp_bias=True)
    sd = hf_state(hf_cfg, transformers.LlamaForCausalLM)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)
    full = full_from_hf(sd, cfg)
    d, p = 8, "model.layers.1.self_attn."
    q, k, v = (sd[f"{p}{n}_proj.weight"] for n in "qkv")
    # Group g: query heads 2g, 2g+1 (HF repeats kv head g for them), then key head g, then value head g.
    for g in range(2):
        expect = torch.cat([q[2 * g * d:(2 * g + 2) * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
        assert torch.equal(full[QKV.format(1, "weight")][g * 4 * d:(g + 1) * 4 * d], expect)
    assert torch.equal(full[QKV.format(1, "bias")][4 * d:6 * d], sd[f"{p}q_proj.bias"][2 * d:])
    mlp = full["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    gate, up = sd["model.layers.1.mlp.gate_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(mlp, torch.cat([gate, up]))
    emb = full["language_model.embedding.word_embeddings.weight"]
    assert emb.shape == (128, 32) and torch.equal(emb[:100], sd["model.embed_tokens.weight"])
    assert not emb[100:].any()


def test_gpt2_c_attn_is_regrouped_per_head():
    hf_cfg = gpt2_config()
    sd = hf_state(hf_cfg, transformers.GPT2LMHeadModel)
    full = full_from_hf(sd, config_from_hf(hf_cfg))
    w, b = sd["transformer.h.2.attn.c_attn.weight"], sd["transformer.h.2.attn.c_attn.bias"]
    ours_w, ours_b = full[QKV.format(2, "weight")], full[QKV.format(2, "bias")]
    d = 8
    for head in range(4):
        cols = [part * 32 + head * d + i for part in range(3) for i in range(d)]  # q_h, k_h, v_h of Conv1D [in, out]
        assert torch.equal(ours_w[head * 3 * d:(head + 1) * 3 * d], w[:, cols].t())
        assert torch.equal(ours_b[head * 3 * d:(head + 1) * 3 * d], b[cols])
    assert torch.equal(full["language_model.encoder.layers.2.mlp.dense_4h_to_h.weight"],
                       sd["transformer.h.2.mlp.c_proj.weight"].t())


def test_early_exit_model_exports_its_exits_beside_the_hf_dict():
    hf_cfg = llama_config()
    sd = hf_state(hf_cfg, transformers.LlamaForCausalLM)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True,
                         untie_exit_output_weights=True)
    g = torch.Generator().manual_seed(1)
    extra = {k: torch.randn(s.shape, generator=g) for k, s in full_state_dict_specs(cfg, ee).items()
             if "exit" in k or ".branch." in k}
    full = full_from_hf(sd, cfg, ee, exits=extra)
    # The backbone MLP of an exit-MLP layer is the trunk, and it is what HF computes.
    assert torch.equal(full["language_model.encoder.layers.2.mlp.trunk.dense_4h_to_h.weight"],
                       sd["model.layers.2.mlp.down_proj.weight"])
    export = hf_from_full(full, cfg, ee)
    assert_same(export.state_dict, sd)
    assert_same(export.exits, extra)
    assert "language_model.exit_output_layer.3.weight" in export.exits
    with pytest.raises(StateDictError, match=r"missing keys: .*layers\.0\.exit_block"):
        full_from_hf(sd, cfg, ee)
    with pytest.raises(StateDictError, match="exits dict holds backbone tensors"):
        full_from_hf(sd, cfg, ee, exits=dict(extra, **{"language_model.encoder.final_norm.weight": torch.ones(32)}))


def test_hf_to_sharded_tp2_pp2_and_back_is_bit_exact():
    hf_cfg = llama_config(tie_word_embeddings=True)
    sd = hf_state(hf_cfg, transformers.LlamaForCausalLM)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64, tp=2)
    ee = EarlyExitConfig(exit_layer_nums=[2], use_exit_norm=True)
    extra = {"language_model.encoder.layers.1.exit_norm.weight": torch.rand(32)}
    part = partition(4, 2, 1, [2])
    full = full_from_hf(sd, cfg, ee, exits=extra)
    ranks = {(r, s, 0): shard_state_dict(full, cfg, 2, r, part, s, 0, ee) for r in range(2) for s in range(2)}
    assert "word_embeddings_for_head.weight" in ranks[0, 1, 0]
    export = hf_from_full(merge_state_dicts(ranks, cfg, 2, part, ee), cfg, ee)
    assert_same(export.state_dict, sd)
    assert_same(export.exits, extra)


@pytest.mark.parametrize("hf_cfg", [llama_config(), llama_config(tie_word_embeddings=True, rope_theta=500000.0),
                                    gpt2_config(), gpt2_config(tie_word_embeddings=False, n_inner=48)],
                         ids=["llama", "llama-tied", "gpt2", "gpt2-untied"])
def test_config_round_trip(hf_cfg):
    cfg = config_from_hf(hf_cfg)
    assert cfg.padded_vocab_size == 100 and cfg.seq_length == 64
    again = config_from_hf(hf_config_from(cfg))
    assert again == cfg


def test_config_values_follow_the_llama_loader():
    cfg = config_from_hf(llama_config(num_key_value_heads=1, head_dim=16), make_vocab_size_divisible_by=64, tp=1)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size, cfg.norm_epsilon) == (1, 16, 48, 1e-5)
    assert (cfg.normalization, cfg.position_embedding_type, cfg.swiglu, cfg.add_bias_linear) == (
        "RMSNorm", "rope", True, False)
    assert cfg.untie_embeddings_and_output_weights and cfg.padded_vocab_size == 128


def test_unsupported_configs_and_mismatched_state_dicts_are_refused():
    with pytest.raises(ConfigError, match="rope scaling"):
        config_from_hf(llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ConfigError, match="attention_bias=True with mlp_bias=False"):
        config_from_hf(llama_config(attention_bias=True))
    with pytest.raises(ConfigError, match="activation_function='gelu' has no equivalent"):
        config_from_hf(gpt2_config(activation_function="gelu"))
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(gpt2_config(scale_attn_by_inverse_layer_idx=True))
    hf_cfg = llama_config()
    sd = hf_state(hf_cfg, transformers.LlamaForCausalLM)
    cfg = config_from_hf(hf_cfg)
    with pytest.raises(StateDictError, match="no 'model.layers.3.self_attn.q_proj.weight'"):
        full_from_hf({k: v for k, v in sd.items() if "layers.3.self_attn.q" not in k}, cfg)
    with pytest.raises(StateDictError, match=r"unexpected Hugging Face keys \['model.layers.4.extra'\]"):
        full_from_hf(dict(sd, **{"model.layers.4.extra": torch.zeros(1)}), cfg)
    tied = config_from_hf(llama_config(tie_word_embeddings=True))
    with pytest.raises(StateDictError, match="lm_head.weight differs from the word embedding"):
        full_from_hf(sd, tied)


# ----------------------------------------------------------------------------- oracle: our model vs HF


def build_chunks(cfg, ee, part, full):
    from megatron.core.parallel_state import ParallelState
    from megatron.model.early_exit_gpt_model import EarlyExitGPTModel

    models = []
    for spec in part.all_specs():  # model order
        model = EarlyExitGPTModel(cfg, ee, state=ParallelState.single(), partition=part, stage=spec.stage,
                                  chunk=spec.chunk, initialize=False).eval()
        model.load_state_dict(shard_state_dict(full, cfg, 1, 0, part, spec.stage, spec.chunk, ee), strict=True)
        models.append(model)
    return models


def run_chunks(models, ids):
    """The stages run one after the other in one process: -> (final logits, {exit layer: exit logits})."""
    hidden, exit_logits = None, {}
    with torch.no_grad():
        for model in models:
            out = model(input_ids=ids if model.spec.has_embedding else None, hidden_states=hidden)
            hidden = out.output
            exit_logits.update(out.exit_logits)
    return hidden, exit_logits


ORACLES = [
    ("llama-gqa", lambda: llama_config(), "LlamaForCausalLM"),
    ("llama-tied-bias", lambda: llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
     "LlamaForCausalLM"),
    ("gpt2", lambda: gpt2_config(n_layer=4), "GPT2LMHeadModel"),
]


@pytest.mark.parametrize("name,make_config,model_cls", ORACLES, ids=[o[0] for o in ORACLES])
def test_converted_model_gives_hf_logits_and_converts_back(name, make_config, model_cls):
    hf_cfg = make_config()
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(hf_cfg).eval()
    sd = hf.state_dict()
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)
    # A tied norm exit at layer 2 with the final norm's weights must equal HF's head on layer 2's output.
    ee = EarlyExitConfig(exit_layer_nums=[2], use_exit_norm=True)
    extra = {key.replace("final_norm.", "layers.1.exit_norm."): t.clone()
             for key, t in full_from_hf(sd, cfg).items() if ".final_norm." in key}
    full = full_from_hf(sd, cfg, ee, exits=extra)
    part = partition(4, 2, 2, ee.exit_layer_nums, [2, 2])
    models = build_chunks(cfg, ee, part, full)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, exit_logits = run_chunks(models, ids)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        base = hf.model if hasattr(hf, "model") else hf.transformer
        final_norm = base.norm if hasattr(base, "norm") else base.ln_f
        ref_exit = hf.lm_head(final_norm(ref.hidden_states[2]))
    assert logits.shape == (2, 12, 128) and ref.logits.std() > 0.1  # large enough for 1e-5 to mean something
    torch.testing.assert_close(logits[..., :100], ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(exit_logits[2][..., :100], ref_exit, rtol=0, atol=1e-5)
    # Back: the chunks' own state dicts -> FULL -> HF is bit-exact, and transformers loads it strictly.
    per_rank = {(0, m.spec.stage, m.spec.chunk): m.state_dict() for m in models}
    export = hf_from_full(merge_state_dicts(per_rank, cfg, 1, part, ee), cfg, ee)
    assert_same(export.state_dict, sd)
    assert_same(export.exits, extra)
    again = getattr(transformers, model_cls)(hf_config_from(cfg))
    again.load_state_dict(export.state_dict, strict=True)
