"""FULL state dict <-> per-rank dicts: EE-LLM key names and TP layouts, bit-exact round trips, clear errors."""

import itertools

import pytest
import torch

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import (
    StateDictError,
    full_state_dict_specs,
    merge_state_dicts,
    rank_key_map,
    shard_state_dict,
)

LAYER0 = "language_model.encoder.layers.0."


def llama_cfg(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=4, kv_channels=4,
                ffn_hidden_size=24, seq_length=16, vocab_size=60, padded_vocab_size=64, normalization="RMSNorm",
                swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                untie_embeddings_and_output_weights=True)
    base.update(kw)
    return ModelConfig(**base)


def gpt_cfg(**kw):
    base = dict(num_layers=4, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, seq_length=16,
                vocab_size=60, padded_vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def random_full(cfg, ee=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s.shape, generator=g) for k, s in full_state_dict_specs(cfg, ee).items()}


def shard_all(full, cfg, ee, tp, part):
    return {
        (r, s, c): shard_state_dict(full, cfg, tp, r, part, s, c, ee)
        for r in range(tp) for s in range(part.pp) for c in range(part.vpp)
    }


def test_full_keys_of_a_plain_gpt_are_ee_llm_names():
    keys = list(full_state_dict_specs(gpt_cfg(num_layers=1)))
    layer = [f"{LAYER0}{n}.{p}" for n in ("input_norm", "self_attention.query_key_value", "self_attention.dense",
                                          "post_attention_norm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
             for p in ("weight", "bias")]
    assert keys == [
        "language_model.embedding.word_embeddings.weight",
        "language_model.embedding.position_embeddings.weight",
        *layer,
        "language_model.encoder.final_norm.weight",
        "language_model.encoder.final_norm.bias",
    ]


def test_rank_keys_local_indices_exits_and_tied_copies():
    cfg = gpt_cfg()
    ee = EarlyExitConfig(exit_layer_nums=[2, 3], use_exit_norm=True, use_exit_mlp=True, untie_exit_output_weights=True)
    part = partition(4, 2, 1, ee.exit_layer_nums)
    stage1 = rank_key_map(cfg, part, 1, 0, ee)
    # Layer 3 is local layer 0 of stage 1; its exit is local exit 0, keyed by layer number in the FULL dict.
    assert stage1["language_model.exit_output_layer.0.weight"] == "language_model.exit_output_layer.3.weight"
    assert stage1[f"{LAYER0}mlp.branch.dense_h_to_4h.weight"] == (
        "language_model.encoder.layers.2.mlp.branch.dense_h_to_4h.weight")
    assert stage1[f"{LAYER0}exit_norm.bias"] == "language_model.encoder.layers.2.exit_norm.bias"
    assert "language_model.encoder.layers.1.mlp.dense_h_to_4h.weight" in stage1  # layer 4: plain MLP
    assert stage1["word_embeddings_for_head.weight"] == "language_model.embedding.word_embeddings.weight"
    stage0 = rank_key_map(cfg, part, 0, 0, ee)
    assert "word_embeddings_for_head.weight" not in stage0
    assert "language_model.embedding.position_embeddings.weight" in stage0
    assert stage0["language_model.exit_output_layer.0.weight"] == "language_model.exit_output_layer.2.weight"
    assert f"{LAYER0}mlp.dense_h_to_4h.weight" in stage0 and f"{LAYER0}exit_norm.weight" not in stage0


def test_tied_exit_on_a_middle_chunk_holds_a_copy_of_the_projection():
    ee = EarlyExitConfig(exit_layer_nums=[2])
    part = partition(4, 2, 2, ee.exit_layer_nums)  # layer 2 = stage 1 chunk 0
    assert rank_key_map(gpt_cfg(), part, 1, 0, ee)["word_embeddings_for_head.weight"] == (
        "language_model.embedding.word_embeddings.weight")
    untied = rank_key_map(llama_cfg(), part, 1, 0, ee)
    assert untied["output_layer_for_exits.weight"] == "language_model.output_layer.weight"
    assert "word_embeddings_for_head.weight" not in untied
    assert "word_embeddings_for_head.weight" not in rank_key_map(gpt_cfg(), part, 0, 1, ee)


def test_swiglu_and_grouped_qkv_shards_follow_megatron():
    cfg, tp = llama_cfg(num_layers=1), 2
    full = random_full(cfg)
    w = full[f"{LAYER0}mlp.dense_h_to_4h.weight"]
    gate, up = w.chunk(2)
    qkv = full[f"{LAYER0}self_attention.query_key_value.weight"]
    dense = full[f"{LAYER0}self_attention.dense.weight"]
    part = partition(1, 1)
    for r in range(tp):
        sd = shard_state_dict(full, cfg, tp, r, part, 0, 0)
        # Each rank holds its slice of the gate AND of the up projection (stride 2).
        assert torch.equal(sd[f"{LAYER0}mlp.dense_h_to_4h.weight"], torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
        # 4 groups of (2 q heads + k + v) x 4 channels: rank r holds groups 2r and 2r+1 whole.
        assert torch.equal(sd[f"{LAYER0}self_attention.query_key_value.weight"], qkv[r * 32:(r + 1) * 32])
        assert torch.equal(sd[f"{LAYER0}self_attention.dense.weight"], dense[:, r * 16:(r + 1) * 16])
        assert sd[f"{LAYER0}input_norm.weight"] is full[f"{LAYER0}input_norm.weight"]
        assert sd["language_model.output_layer.weight"].shape == (32, 32)


def test_row_parallel_bias_is_replicated_and_column_bias_is_cut():
    cfg, tp = gpt_cfg(num_layers=1), 4
    full = random_full(cfg)
    sd = shard_state_dict(full, cfg, tp, 3, partition(1, 1), 0, 0)
    assert torch.equal(sd[f"{LAYER0}mlp.dense_4h_to_h.bias"], full[f"{LAYER0}mlp.dense_4h_to_h.bias"])
    assert torch.equal(sd[f"{LAYER0}mlp.dense_h_to_4h.bias"], full[f"{LAYER0}mlp.dense_h_to_4h.bias"][24:])
    assert sd["language_model.embedding.position_embeddings.weight"].shape == (16, 16)
    assert sd["language_model.embedding.word_embeddings.weight"].shape == (16, 16)


HEADS = [dict(), dict(use_exit_norm=True), dict(use_exit_norm=True, use_exit_mlp=True),
         dict(use_exit_norm=True, use_exit_block=True), dict(use_exit_mlp=True, use_exit_block=True)]
LAYOUTS = [(1, 1, None), (2, 1, None), (4, 1, None), (2, 2, None), (2, 1, [1, 3]), (2, 2, [2, 6])]


@pytest.mark.parametrize("make_cfg", [gpt_cfg, llama_cfg], ids=["gpt", "llama"])
@pytest.mark.parametrize("untie_exits", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "+".join(k[9:] for k in h) or "plain")
def test_shard_then_merge_is_bit_exact(make_cfg, untie_exits, heads):
    for tp, (pp, vpp, split) in itertools.product((1, 2, 4), LAYOUTS):
        layers = sum(split) if split else 4
        cfg = make_cfg(num_layers=layers)
        exits = [1, 3] if layers == 4 else [2, 5, 8]
        ee = EarlyExitConfig(exit_layer_nums=exits, untie_exit_output_weights=untie_exits, **heads)
        full = random_full(cfg, ee, seed=tp)
        part = partition(layers, pp, vpp, exits, split)
        merged = merge_state_dicts(shard_all(full, cfg, ee, tp, part), cfg, tp, part, ee)
        assert list(merged) == list(full)
        for key in full:
            assert torch.equal(merged[key], full[key]), (tp, pp, vpp, split, key)


def test_merge_then_shard_is_bit_exact_for_resharding():
    cfg = llama_cfg()
    ee = EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_block=True, untie_exit_output_weights=True)
    full = random_full(cfg, ee)
    src = partition(4, 2, 1, ee.exit_layer_nums)
    dst = partition(4, 4, 1, ee.exit_layer_nums)
    resharded = merge_state_dicts(shard_all(full, cfg, ee, 2, src), cfg, 2, src, ee)
    back = merge_state_dicts(shard_all(resharded, cfg, ee, 4, dst), cfg, 4, dst, ee)
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_missing_unexpected_and_misshaped_keys_are_named():
    cfg = gpt_cfg()
    part = partition(4, 1)
    full = random_full(cfg)
    bad = dict(full)
    del bad["language_model.encoder.layers.3.mlp.dense_4h_to_h.bias"]
    bad["language_model.encoder.layers.4.input_norm.weight"] = torch.zeros(16)
    with pytest.raises(StateDictError, match=r"missing keys: language_model\.encoder\.layers\.3\.mlp\.dense_4h_to_h"
                                             r"\.bias; unexpected keys: language_model\.encoder\.layers\.4"):
        shard_state_dict(bad, cfg, 1, 0, part, 0, 0)
    bad = dict(full, **{"language_model.encoder.final_norm.weight": torch.zeros(8)})
    with pytest.raises(StateDictError, match=r"final_norm\.weight' has shape \(8,\).*expects \(16,\)"):
        shard_state_dict(bad, cfg, 1, 0, part, 0, 0)
    ee = EarlyExitConfig(exit_layer_nums=[2], use_exit_norm=True)
    with pytest.raises(StateDictError, match=r"missing keys: language_model\.encoder\.layers\.1\.exit_norm\.bias"):
        shard_state_dict(full, cfg, 1, 0, partition(4, 1, 1, [2]), 0, 0, ee)


def test_merge_refuses_disagreeing_copies_missing_ranks_and_bad_tp():
    cfg = gpt_cfg()
    ee = EarlyExitConfig(exit_layer_nums=[1])
    part = partition(4, 2, 1, [1])
    full = random_full(cfg, ee)
    ranks = shard_all(full, cfg, ee, 2, part)
    ranks[1, 1, 0]["word_embeddings_for_head.weight"] = ranks[1, 1, 0]["word_embeddings_for_head.weight"] + 1
    with pytest.raises(StateDictError, match="copies of 'language_model.embedding.word_embeddings.weight' disagree"):
        merge_state_dicts(ranks, cfg, 2, part, ee)
    ranks = shard_all(full, cfg, ee, 2, part)
    ranks[0, 1, 0]["language_model.encoder.final_norm.weight"] = torch.zeros(16)
    with pytest.raises(StateDictError, match="copies of 'language_model.encoder.final_norm.weight' disagree"):
        merge_state_dicts(ranks, cfg, 2, part, ee)
    del ranks[1, 0, 0]
    with pytest.raises(StateDictError, match=r"missing \[\(1, 0, 0\)\]"):
        merge_state_dicts(ranks, cfg, 2, part, ee)
    with pytest.raises(ConfigError, match="--num-query-groups.*not divisible by --tensor-model-parallel-size 3"):
        shard_state_dict(full, cfg, 3, 0, part, 0, 0, ee)
    with pytest.raises(ConfigError, match=r"partition places exits \[1\] but --exit-layer-nums is \[\]"):
        shard_state_dict(random_full(cfg), cfg, 1, 0, part, 0, 0)


def test_unset_padded_vocab_is_refused():
    with pytest.raises(ConfigError, match="padded_vocab_size is unset"):
        full_state_dict_specs(gpt_cfg(padded_vocab_size=None))


def _models_state(cfg, ee, part, tp, rank):
    from megatron.core.parallel_state import ParallelDims, ParallelState
    from megatron.model.early_exit_gpt_model import EarlyExitGPTModel

    # Construction only (no collective): a state with tp ranks but no group builds that rank's shards.
    state = ParallelState(dims=ParallelDims(tp=tp), rank=rank)
    return {(rank, s.stage, s.chunk): EarlyExitGPTModel(cfg, ee, state=state, partition=part, stage=s.stage,
                                                        chunk=s.chunk).state_dict() for s in part.all_specs()}


@pytest.mark.parametrize("make_cfg", [gpt_cfg, llama_cfg], ids=["gpt", "llama"])
@pytest.mark.parametrize("untie_exits", [False, True], ids=["tied", "untied"])
def test_model_state_dicts_are_the_shards_of_one_full_dict(make_cfg, untie_exits):
    """The model's own per-rank dicts (seeded init, tp=2) are exactly shard_state_dict of the tp=1 model."""
    cfg = make_cfg(num_layers=4)
    ee = EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True,
                         untie_exit_output_weights=untie_exits)
    part = partition(4, 2, 2, ee.exit_layer_nums)
    full = merge_state_dicts(_models_state(cfg, ee, part, 1, 0), cfg, 1, part, ee)
    for rank in range(2):
        for (r, s, c), sd in _models_state(cfg, ee, part, 2, rank).items():
            ref = shard_state_dict(full, cfg, 2, r, part, s, c, ee)
            assert set(sd) == set(ref)
            assert all(torch.equal(sd[k], ref[k]) for k in sd), (r, s, c)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "+".join(k[9:] for k in h) or "plain")
def test_shards_load_strictly_into_every_chunk(heads):
    from megatron.core.parallel_state import ParallelState
    from megatron.model.early_exit_gpt_model import EarlyExitGPTModel

    for make_cfg, untie_exits in itertools.product((gpt_cfg, llama_cfg), (False, True)):
        cfg = make_cfg(num_layers=8)
        ee = EarlyExitConfig(exit_layer_nums=[2, 5, 8], untie_exit_output_weights=untie_exits, **heads)
        full = random_full(cfg, ee)
        part = partition(8, 2, 2, ee.exit_layer_nums, [2, 6])
        for spec in part.all_specs():
            model = EarlyExitGPTModel(cfg, ee, state=ParallelState.single(), partition=part, stage=spec.stage,
                                      chunk=spec.chunk, initialize=False)
            model.load_state_dict(shard_state_dict(full, cfg, 1, 0, part, spec.stage, spec.chunk, ee), strict=True)
            to_full = rank_key_map(cfg, part, spec.stage, spec.chunk, ee)
            for key, value in model.state_dict().items():
                assert torch.equal(value, full[to_full[key]]), key


def test_ee_llm_layout_keeps_the_unused_embedding_copy_on_untied_exit_stages():
    cfg = gpt_cfg()
    ee = EarlyExitConfig(exit_layer_nums=[1, 3], untie_exit_output_weights=True)
    part = partition(4, 4, 1, ee.exit_layer_nums)
    full = random_full(cfg, ee)
    ours = {(0, s, 0): shard_state_dict(full, cfg, 1, 0, part, s, 0, ee) for s in range(4)}
    ee_llm = {(0, s, 0): shard_state_dict(full, cfg, 1, 0, part, s, 0, ee, ee_llm=True) for s in range(4)}
    # Stage 2 owns exit 3: EE-LLM keeps a copy there, we do not; the last stage has it in both layouts.
    assert [("word_embeddings_for_head.weight" in ours[0, s, 0]) for s in range(4)] == [False, False, False, True]
    assert [("word_embeddings_for_head.weight" in ee_llm[0, s, 0]) for s in range(4)] == [False, False, True, True]
    merged = merge_state_dicts(ee_llm, cfg, 1, part, ee)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    ee_llm[0, 2, 0]["word_embeddings_for_head.weight"] = torch.zeros(64, 16)
    with pytest.raises(StateDictError, match="copies of 'language_model.embedding.word_embeddings.weight' disagree"):
        merge_state_dicts(ee_llm, cfg, 1, part, ee)
