"""Cheap exit checks at inference: the reduced-vocabulary exit projection (``exit_vocab``), the learned
``estimator`` confidence measure and the ``estimator_floor`` pre-filter -- each against a reference computed
by hand, and each paying for an exit's vocabulary projection only where it must."""

import pytest
import torch

from megatron.config import EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import tiny_config
from megatron.text_generation.confidence import MEASURES
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.exit_rule import ExitRule, ExitWalk
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, RequestError, SamplingParams, parse_api_request
from megatron.text_generation.request_checks import check_request
from megatron.text_generation.request import DEFAULT_LIMITS, GenerationRequest
from megatron.text_generation.server import ModelInfo
from megatron.tokenizer.null import NullTokenizer

VOCAB, EXITS = 96, (1, 2)
KEEP = torch.tensor(sorted({3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59}))
PROMPT = [5, 17, 33, 2, 60, 8]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def model(exit_vocab: bool = True, estimator: bool = True, seed: int = 11) -> EarlyExitGPTModel:
    cfg = tiny_config(None, vocab_size=VOCAB, make_vocab_size_divisible_by=32, seq_length=64, init_method_std=0.25,
                      seed=seed, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                      add_bias_linear=False, ffn_hidden_size=48)
    ee = EarlyExitConfig(exit_layer_nums=list(EXITS), use_exit_norm=True, use_exit_linear=True, exit_estimator=estimator,
                         exit_vocab_size=len(KEEP) if exit_vocab else 0)
    m = EarlyExitGPTModel(cfg, ee, state=ParallelState.single()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.language_model.encoder.layers:  # a non-zero exit linear, so it is exercised
            if getattr(layer, "exit_linear", None) is not None:
                for p in layer.exit_linear.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if exit_vocab:
            m.exit_vocab.copy_(KEEP)
    return m


def engine(m):
    return InferenceEngine([m], m.state, NullTokenizer(VOCAB), m.config, m.ee)


def test_reduced_vocabulary_exits_project_onto_their_ids_only():
    full, reduced = model(exit_vocab=False), model(exit_vocab=True)
    ids = torch.tensor([PROMPT])
    a = full.infer(ids, inference_params=None, exits=EXITS)
    b = reduced.infer(ids, inference_params=None, exits=EXITS)
    torch.testing.assert_close(b.final.logits(), a.final.logits())  # the final head keeps the whole vocabulary
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[KEEP] = False
    for layer in EXITS:
        got, want = b.exits[layer].logits(), a.exits[layer].logits()
        torch.testing.assert_close(got[:, KEEP], want[:, KEEP], rtol=1e-5, atol=1e-5)
        assert torch.isneginf(got[:, outside]).all()
        # the exit's top-1 over its vocabulary, as decoding picks it
        assert torch.equal(got.argmax(-1), KEEP[want[:, KEEP].argmax(-1)])


def test_an_unfilled_exit_vocabulary_keeps_the_whole_vocabulary():
    m = model(exit_vocab=True)
    with torch.no_grad():
        m.exit_vocab.fill_(-1)  # as --exit-vocab-size leaves it before the converter fills it
    view = m.infer(torch.tensor([PROMPT]), inference_params=None, exits=EXITS).exits[1]
    assert torch.isfinite(view.logits()).all()


def test_estimator_measure_is_the_sigmoid_of_the_exit_estimator_on_the_trunk_state():
    m = model()
    out = m.infer(torch.tensor([PROMPT]), inference_params=None, exits=EXITS)
    hidden = {}
    hooks = [layer.register_forward_hook(lambda mod, args, o, n=layer.layer_number: hidden.__setitem__(n, o))
             for layer in m.language_model.encoder.layers]
    with torch.no_grad():
        m(input_ids=torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    rule = ExitRule(list(EXITS), measure="estimator", threshold=0.5)
    for layer in EXITS:
        trunk = hidden[layer][0][:, 0]  # the exit layer's output [s, h], sequence 0
        want = torch.sigmoid(m.exit_estimate(layer, trunk))
        got = rule.confidence(out.exits[layer], None)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not out.exits[layer].computed()  # the estimate needs no projection


def test_decoding_with_the_estimator_projects_only_where_an_exit_fires(projections):
    eng = engine(model())
    sampling = SamplingParams(tokens_to_generate=6, greedy=True)
    never = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(use_early_exit=True, early_exit_thres=1.0,
                                                                     confidence="estimator"))
    assert never.exit_layers == [[4] * 6]
    assert set(projections) == {4}  # no exit ever projected: only the final head (layer 4)
    projections.clear()
    always = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(use_early_exit=True, early_exit_thres=0.0,
                                                                      confidence="estimator", exit_layers=[2]))
    assert always.exit_layers == [[2] * 6]
    assert projections.get(2) == 6 and 1 not in projections  # one projection per token, at the exit that fired
    # the token of an exit that fires is its top-1 over its vocabulary
    assert set(always.tokens[0]) <= set(KEEP.tolist())


def test_the_estimator_floor_filters_the_measure(projections):
    eng = engine(model())
    sampling = SamplingParams(tokens_to_generate=6, greedy=True)
    base = dict(use_early_exit=True, early_exit_thres=0.0, confidence="top1")
    closed = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(**base, estimator_floor=1.0))
    assert closed.exit_layers == [[4] * 6] and set(projections) == {4}
    projections.clear()
    open_ = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(**base, estimator_floor=0.0))
    plain = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(**base))
    assert open_.tokens == plain.tokens and open_.exit_layers == plain.exit_layers == [[1] * 6]


def test_the_floor_applies_row_by_row():
    m = model()
    out = m.infer(torch.tensor([PROMPT, PROMPT[::-1]]), inference_params=None, num_last=1, exits=EXITS)
    view = out.exits[1]
    est = torch.sigmoid(m.exit_estimate(1, view.trunk)).detach()
    floor = float(est.mean())  # one row above, one below (the two differ)
    assert (est >= floor).sum() == 1
    conf = ExitRule(list(EXITS), measure="top1", estimator_floor=floor).confidence(view, None)
    top1 = torch.softmax(view.logits(), -1).max(-1).values
    torch.testing.assert_close(conf, torch.where(est >= floor, top1, -1.0))
    walk = ExitWalk(ExitRule(list(EXITS), measure="top1", threshold=0.0, estimator_floor=floor),
                    torch.zeros(2, dtype=torch.bool))
    assert walk.visit(view).tolist() == (est >= floor).tolist()


def test_speculative_decoding_with_a_reduced_vocabulary_draft_equals_greedy():
    eng = engine(model())
    sampling = SamplingParams(tokens_to_generate=10, greedy=True)
    full = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams())
    for k in (1, 3):
        spec = generate_tokens(eng, [PROMPT], sampling, EarlyExitParams(decoding="speculative", draft_exit_layer=1,
                                                                        num_speculative_tokens=k))
        assert spec.tokens == full.tokens


def test_requests_carry_the_estimator_fields_and_are_checked_against_the_model():
    assert "estimator" in MEASURES
    req = parse_api_request({"prompts": ["1 2"], "tokens_to_generate": 2, "use_early_exit": True,
                             "confidence": "estimator", "estimator_floor": 0.25})
    assert req.early_exit.confidence == "estimator" and req.early_exit.estimator_floor == 0.25
    for bad in ({"estimator_floor": 1.5}, {"estimator_floor": "x"},
                {"use_early_exit": False, "decoding": "full", "estimator_floor": 0.5}):
        body = {"prompts": ["1 2"], "tokens_to_generate": 2, "use_early_exit": True, **bad}
        with pytest.raises(RequestError) as e:
            parse_api_request(body)
        assert e.value.field == "estimator_floor"
    without = ModelInfo(num_layers=4, exit_layers=list(EXITS), vocab_size=VOCAB, estimators=False)
    for field, ee in (("confidence", EarlyExitParams(use_early_exit=True, confidence="estimator")),
                      ("estimator_floor", EarlyExitParams(use_early_exit=True, estimator_floor=0.2))):
        with pytest.raises(RequestError) as e:
            check_request(GenerationRequest(["1 2"], SamplingParams(tokens_to_generate=2), ee), without, DEFAULT_LIMITS)
        assert e.value.field == field
    check_request(GenerationRequest(["1 2"], SamplingParams(tokens_to_generate=2), ee),
                  ModelInfo(num_layers=4, exit_layers=list(EXITS), vocab_size=VOCAB, estimators=True), DEFAULT_LIMITS)
