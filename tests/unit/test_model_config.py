"""Model / early-exit config validation (errors name the flag), stage partitioning and the exit-weight
warm-up schedule: pure, no processes."""

import math

import pytest

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel, exit_weight, exit_weights, partition


def validate_all(model, ee, tp=1, pp=1, vpp=1, layers_per_stage=None):
    """The model, the exits and the stage split checked together, as RunConfig.validate checks them."""
    model.validate(tp)
    ee.validate(model.num_layers)
    partition(model.num_layers, pp, vpp, ee.exit_layer_nums, layers_per_stage)


def _model(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=8)
    base.update(kw)
    return ModelConfig(**base)


INVALID = [
    (dict(), dict(exit_layer_nums=[0, 2]), {}, "--exit-layer-nums"),
    (dict(), dict(exit_layer_nums=[2, 5]), {}, "--exit-layer-nums"),
    (dict(), dict(exit_layer_nums=[3, 1]), {}, "--exit-layer-nums"),
    (dict(), dict(exit_layer_nums=[2, 2]), {}, "--exit-layer-nums"),
    (dict(), dict(exit_layer_nums=[1, 2], exit_layer_weight=[0.5]), {}, "--exit-layer-weight "),
    (dict(), dict(exit_layer_nums=[1, 2], exit_layer_weight_init=[0.1, 0.2, 0.3]), {}, "--exit-layer-weight-init"),
    (dict(), dict(exit_layer_nums=[1, 2], exit_layer_temperature=[1.0]), {}, "--exit-layer-temperature"),
    (dict(), dict(exit_layer_nums=[1], exit_layer_temperature=[0.0]), {}, "--exit-layer-temperature"),
    (dict(), dict(exit_layer_nums=[1], exit_layer_weight=[-1.0]), {}, "--exit-layer-weight"),
    (dict(), dict(exit_layer_weight_warmup_iters=-1), {}, "--exit-layer-weight-warmup-iters"),
    (dict(), dict(exit_layer_weight_warmup_style="step"), {}, "--exit-layer-weight-warmup-style"),
    (dict(), dict(use_exit_mlp=True), {}, "--use-exit-mlp"),
    (dict(), dict(exit_layer_nums=[2], use_exit_mlp=True, pre_exit=True), {}, "--use-exit-mlp"),
    (dict(num_attention_heads=6, hidden_size=36), dict(), dict(tp=4), "--num-attention-heads"),
    (dict(num_attention_heads=8, num_query_groups=2), dict(), dict(tp=4), "--num-query-groups"),
    (dict(num_attention_heads=8, num_query_groups=3), dict(), {}, "--num-query-groups"),
    (dict(num_layers=5), dict(), dict(pp=2), "--num-layers"),
    (dict(num_layers=4), dict(), dict(pp=2, vpp=4), "--num-layers"),
    (dict(), dict(), dict(pp=2, layers_per_stage=[3, 2]), "--layers-per-stage"),
    (dict(), dict(), dict(pp=2, layers_per_stage=[4]), "--layers-per-stage"),
    (dict(), dict(), dict(pp=2, vpp=2, layers_per_stage=[3, 1]), "--layers-per-stage"),
    (dict(normalization="BatchNorm"), dict(), {}, "--normalization"),
    (dict(position_embedding_type="alibi"), dict(), {}, "--position-embedding-type"),
    (dict(position_embedding_type="rope", rotary_percent=0.1), dict(), {}, "--rotary-percent"),
    (dict(recompute_granularity="full"), dict(), {}, "--recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), dict(), {}, "--recompute-num-layers"),
    (dict(recompute_method="block"), dict(), {}, "--recompute-granularity"),
    (dict(hidden_size=30), dict(), {}, "--hidden-size"),
    (dict(sequence_parallel=True, seq_length=6), dict(), dict(tp=4), "--sequence-parallel"),
    (dict(seq_length=32, max_position_embeddings=16), dict(), {}, "--max-position-embeddings"),
    (dict(padded_vocab_size=90), dict(), {}, "--padded-vocab-size"),
    (dict(swiglu=True, hidden_size=16, num_attention_heads=2), dict(), {}, "--ffn-hidden-size"),
]


@pytest.mark.parametrize("model_kw,ee_kw,par,flag", INVALID, ids=[case[3] + str(i) for i, case in enumerate(INVALID)])
def test_invalid_configs_name_the_flag(model_kw, ee_kw, par, flag):
    with pytest.raises(ConfigError, match=flag):
        validate_all(_model(**model_kw), EarlyExitConfig(**ee_kw), **par)


def test_model_refuses_invalid_config_before_building():
    with pytest.raises(ConfigError, match="--exit-layer-nums"):
        EarlyExitGPTModel(_model(), EarlyExitConfig(exit_layer_nums=[9]), state=ParallelState.single())


def test_valid_configs_and_defaults():
    validate_all(_model(num_attention_heads=8, num_query_groups=4, sequence_parallel=True), EarlyExitConfig(
        exit_layer_nums=[1, 4], use_exit_mlp=True, use_exit_block=True, use_exit_norm=True), tp=4, pp=2)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3])
    assert ee.weights == [1.0, 1.0] and ee.weight_inits == [0.0, 0.0] and ee.temperatures == [1.0, 1.0]
    assert _model(swiglu=True, hidden_size=64).ffn_size == 128 and _model().ffn_size == 128
    assert _model().padded_vocab(1) == 128 and _model().padded_vocab(2) == 256


def test_even_partition_and_exit_placement():
    p = partition(8, 4, 1, exit_layers=[2, 3, 8])
    assert [s.layers for s in p.all_specs()] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert [s.exits for s in p.all_specs()] == [(2,), (3,), (), (8,)]
    assert p.exit_stages == [0, 1, 3]
    assert [(s.has_embedding, s.has_head) for s in p.all_specs()] == [(True, False), (False, False),
                                                                     (False, False), (False, True)]


def test_interleaved_partition_is_megatron_order():
    p = partition(8, 2, 2, exit_layers=[3, 5])
    # chunk c of stage s owns block c * pp + s
    assert p.spec(0, 0).layers == (1, 2) and p.spec(1, 0).layers == (3, 4)
    assert p.spec(0, 1).layers == (5, 6) and p.spec(1, 1).layers == (7, 8)
    assert p.spec(1, 0).exits == (3,) and p.spec(0, 1).exits == (5,)
    assert p.spec(0, 0).has_embedding and p.spec(1, 1).has_head and not p.spec(1, 0).has_head
    assert p.exit_stages == [0, 1] and p.owner(6) == p.spec(0, 1)


def test_uneven_partition():
    p = partition(7, 3, 1, exit_layers=[4], layers_per_stage=[3, 3, 1])
    assert [s.layers for s in p.all_specs()] == [(1, 2, 3), (4, 5, 6), (7,)]
    assert p.exit_stages == [1] and p.layers_per_stage == (3, 3, 1)
    p = partition(6, 2, 2, layers_per_stage=[4, 2])
    assert [s.layers for s in p.all_specs()] == [(1, 2), (3,), (4, 5), (6,)]


def test_exit_weight_schedule():
    assert exit_weight(0, 1.0, 0.0, 0) == 1.0
    assert exit_weight(0, 0.8, 0.2, 10) == 0.2
    assert math.isclose(exit_weight(5, 0.8, 0.2, 10), 0.5)
    assert exit_weight(10, 0.8, 0.2, 10) == 0.8 and exit_weight(50, 0.8, 0.2, 10) == 0.8
    assert math.isclose(exit_weight(5, 1.0, 0.0, 10, "cosine"), 0.5)
    assert math.isclose(exit_weight(2, 1.0, 0.0, 8, "cosine"), (1 - math.cos(math.pi / 4)) / 2)
    assert math.isclose(exit_weight(5, 0.1, 0.9, 10), 0.5)  # cool-down: init above target
    ee = EarlyExitConfig(exit_layer_nums=[2, 4], exit_layer_weight=[0.4, 1.0], exit_layer_weight_init=[0.0, 2.0],
                         exit_layer_weight_warmup_iters=4)
    assert exit_weights(2, ee) == {2: 0.2, 4: 1.5}
    with pytest.raises(ValueError, match="warmup-style"):
        exit_weight(1, 1.0, 0.0, 4, "exp")
