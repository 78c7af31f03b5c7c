"""Confidence measures and CALM's decaying threshold in early-exit generation (single process): each
measure decides exactly as a cache-free oracle built on the evaluation scorer's full forward (any method,
batches of different prompt lengths, a decaying threshold), hand-built exit heads and layers give known
decisions, the carry moves the cosine measure's hidden state losslessly, and the clients' flags reach the
generation through the HTTP server."""

import argparse
import math

import pytest
import torch

from megatron.evaluation.scoring import ExitScorer
from megatron.text_generation.confidence import MEASURES, confidence, decayed_threshold
from megatron.model.inference import HeadView
from megatron.text_generation.messages import Carry
from megatron.text_generation.sampling import Draws
from megatron.text_generation.strategies.early_exit import TokenPicker, exit_rule
from megatron.text_generation.generation import generate, generate_tokens
from megatron.text_generation.request import SamplingParams
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo
from tools.request_client import add_request_flags, early_exit_fields, parse_request_flags, put_api

from megatron.testing.generation import CONFIDENCE_THRES as THRES
from megatron.testing.generation import CONFIDENCE_TOKENS as TOKENS
from megatron.testing.generation import PROMPTS, VOCAB, configs, engine, exits, greedy, oracle_greedy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

NUM_LAYERS = 4
# the measures of a model's logits and hidden states; the learned "estimator" needs exits tuned with
# --exit-estimator and is checked against its own reference in test_exit_inference.py
MEASURES = tuple(m for m in MEASURES if m != "estimator")
# THRES: per measure, a threshold that some exits of the tiny gpt model pass and others do not


@pytest.fixture(scope="module")
def gpt():
    return engine(*configs("gpt", exits=(1, 2, 3)))


@pytest.fixture(scope="module")
def runs(gpt):
    """Generation results by (measure, method, decay, exit_layers, threshold), each computed once."""
    cache = {}

    def run(measure, method="recompute", decay=None, exit_layers=(), thres=None):
        key = (measure, method, decay, exit_layers, thres)
        if key not in cache:
            params = exits(THRES[measure] if thres is None else thres, method, confidence=measure,
                           threshold_decay=decay, exit_layers=list(exit_layers))
            cache[key] = generate_tokens(gpt, PROMPTS, greedy(TOKENS), params)
        return cache[key]

    return run


@torch.no_grad()
def oracle(model, prompt, generated, measure, thres, allowed=(1, 2, 3), decay=None):
    """Tokens and exit layers of greedy early exit, recomputed from one full forward of the generated
    sequence: at each position the first allowed exit whose confidence reaches the (decayed) threshold;
    ``cosine`` compares with the previous exit of the model, allowed or not."""
    logits, hidden, final = ExitScorer([model]).forward(torch.tensor([prompt + generated]))
    tokens, layers = [], []
    for k in range(len(generated)):
        pos, chosen, prev = len(prompt) - 1 + k, NUM_LAYERS, None
        bar = decayed_threshold(thres, k, TOKENS, decay) if decay else thres
        for layer in sorted(logits):
            cur = hidden[layer][0, pos:pos + 1]
            conf = confidence(measure, logits[layer][0, pos:pos + 1], prev_hidden=prev, hidden=cur)
            if layer in allowed and float(conf) >= bar:
                chosen = layer
                break
            prev = cur
        layers.append(chosen)
        tokens.append(int((final if chosen == NUM_LAYERS else logits[chosen])[0, pos].argmax()))
    return tokens, layers


def _check_against_oracle(gpt, runs, measure, method="recompute", decay=None, exit_layers=(), thres=None):
    """Prompts of lengths 6, 3 and 5 in one batch: the decaying threshold counts each sequence's own tokens."""
    out = runs(measure, method, decay, exit_layers, thres)
    thres = THRES[measure] if thres is None else thres
    for prompt, tokens, layers in zip(PROMPTS, out.tokens, out.exit_layers):
        assert (tokens, layers) == oracle(gpt.model, prompt, tokens, measure, thres, exit_layers or (1, 2, 3), decay)
    return [layer for row in out.exit_layers for layer in row]


@pytest.mark.parametrize("method", ["recompute", "pipeline"], ids=["A", "B"])
@pytest.mark.parametrize("measure", MEASURES)
def test_each_measure_decides_as_the_full_forward_oracle(gpt, runs, measure, method):
    layers = _check_against_oracle(gpt, runs, measure, method)
    assert len(set(layers)) > 1 and NUM_LAYERS in layers, layers  # the threshold separates tokens
    if measure == "cosine":
        assert 1 not in layers  # nothing to compare with at the first exit


def test_measures_disagree_on_which_tokens_exit(runs):
    assert len({str(runs(m).exit_layers) for m in MEASURES}) == len(MEASURES)


@pytest.mark.parametrize("measure, method", [("margin", "recompute"), ("cosine", "pipeline")])
def test_decaying_threshold_decides_as_the_oracle(gpt, runs, measure, method):
    _check_against_oracle(gpt, runs, measure, method, decay=4.0)
    assert runs(measure, method, 4.0).exit_layers != runs(measure, method).exit_layers


def test_cosine_compares_with_an_exit_that_may_not_fire(gpt, runs):
    assert 2 in _check_against_oracle(gpt, runs, "cosine", "pipeline", exit_layers=(2,), thres=0.6)


@pytest.mark.parametrize("measure", MEASURES)
def test_threshold_zero_exits_every_token_at_the_first_exit(gpt, measure):
    out = generate_tokens(gpt, PROMPTS[:1], greedy(4), exits(0.0, confidence=measure))
    assert out.exit_layers == [[1] * 4]
    assert out.tokens[0] == oracle_greedy(gpt.model, PROMPTS[0], 4, exit_layer=1)


@pytest.fixture(scope="module")
def constant_exit():
    """gpt, exit 1 with a LayerNorm of weight 0 and bias e_0 (its hidden state is e_0 whatever the input)
    and an untied head whose only nonzero entry makes token 7's logit ln(285): probability 3/4, the 95
    other tokens 1/380 each."""
    eng = engine(*configs("gpt", exits=(1,), use_exit_norm=True, untie_exit_output_weights=True))
    layer1 = eng.model.language_model.encoder.layers[0]
    with torch.no_grad():
        layer1.exit_norm.weight.zero_()
        layer1.exit_norm.bias.zero_()
        layer1.exit_norm.bias[0] = 1.0
        head = eng.model.language_model.exit_output_layer[0].weight
        head.zero_()
        head[7, 0] = math.log(3 * (VOCAB - 1))
    return eng


def _known_confidence(measure: str) -> float:
    p, q = 0.75, 0.25 / (VOCAB - 1)
    entropy = -p * math.log(p) - (VOCAB - 1) * q * math.log(q)
    return {"top1": p, "margin": p - q, "entropy": 1 - entropy / math.log(VOCAB)}[measure]


@pytest.mark.parametrize("measure", ["top1", "margin", "entropy"])
def test_hand_built_exit_head_gives_known_confidence(constant_exit, measure):
    conf = _known_confidence(measure)
    below = generate_tokens(constant_exit, PROMPTS[:2], greedy(3), exits(conf - 1e-3, confidence=measure))
    assert below.exit_layers == [[1] * 3] * 2 and below.tokens == [[7] * 3] * 2
    above = generate_tokens(constant_exit, PROMPTS[:2], greedy(3), exits(conf + 1e-3, confidence=measure))
    assert above.exit_layers == [[NUM_LAYERS] * 3] * 2


def test_cosine_fires_where_the_hidden_state_stopped_changing():
    """llama, exits 1 and 2, layer 2 an identity (its residual branches zeroed): exit 2's hidden state
    equals exit 1's, cosine 1."""
    eng = engine(*configs("llama", exits=(1, 2)))
    with torch.no_grad():
        layer2 = eng.model.language_model.encoder.layers[1]
        layer2.self_attention.dense.weight.zero_()
        layer2.mlp.dense_4h_to_h.weight.zero_()
    out = generate_tokens(eng, PROMPTS, greedy(4), exits(0.999, confidence="cosine"))
    assert out.exit_layers == [[2] * 4] * len(PROMPTS)
    assert out.tokens[0] == oracle_greedy(eng.model, PROMPTS[0], 4, exit_layer=2)


def _picker(thres, decay, lags=None, tokens=10):
    eng_cfg = configs("gpt", exits=(1,))[1]
    rule = exit_rule(exits(thres, threshold_decay=decay), eng_cfg)
    picker = TokenPicker(rule, SamplingParams(tokens_to_generate=tokens, greedy=True), Draws(0), num_layers=NUM_LAYERS,
                         lags=lags)
    return picker


def _fires(picker, step, confident: float, b=1):
    """Exit 1 with two-token logits whose top-1 probability is ``confident``."""
    p = torch.tensor([confident, 1 - confident])
    logits = torch.log(p).view(1, 1, 2).repeat(b, 1, 1)
    picker.begin(Carry.start(torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long)), step)
    picker.decide(HeadView.of(1, logits=logits[:, -1]))
    return picker.carry.exited.tolist()  # the sequences that left at exit 1


def test_decaying_threshold_lowers_the_bar_for_later_tokens():
    # bar 0.9 * 0.6 + 0.1 exp(-5 t / 10): 0.64 for the first token, 0.5411 for the last of 10
    picker = _picker(0.6, 5.0)
    assert [_fires(picker, t, 0.58) for t in (0, 1, 9)] == [[False], [False], [True]]
    assert _fires(_picker(0.6, None), 9, 0.58) == [False] and _fires(_picker(0.6, 0.0), 9, 0.58) == [False]
    assert _fires(_picker(0.6, None), 0, 0.61) == [True]
    # per sequence: at step 9 a prompt 9 tokens longer generates its first token, under the highest bar
    lagged = _picker(0.6, 5.0, lags=torch.tensor([0, 9]))
    assert _fires(lagged, 9, 0.58, b=2) == [True, False]


def test_bad_threshold_decay_is_named():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold_decay"):
            _picker(0.5, bad)


def test_carry_moves_the_hidden_state_exactly():
    carry = Carry.start(torch.tensor([True, False]), torch.tensor([3, 4]))
    assert Carry.unpack(carry.pack(5), 5).prev_hidden is None
    carry.prev_hidden = torch.randn(2, 5)
    packed = carry.pack(5)
    assert packed.numel() == Carry.packed_len(2, 5) and carry.pack().numel() == Carry.packed_len(2)
    back = Carry.unpack(packed, 5)
    assert torch.equal(back.prev_hidden, carry.prev_hidden) and back.exited.tolist() == [True, False]
    assert back.token.tolist() == [3, 4]


def _client(argv):
    return parse_request_flags(add_request_flags(argparse.ArgumentParser(), tokens=8), argv)


def test_client_flags_send_the_measure_and_the_decay():
    fields = early_exit_fields(_client(["--use-early-exit", "--confidence", "entropy", "--threshold-decay", "4"]))
    assert (fields["confidence"], fields["threshold_decay"], fields["use_early_exit"]) == ("entropy", 4.0, True)
    assert "confidence" not in early_exit_fields(_client(["--use-early-exit"]))
    for argv in (["--confidence", "margin"], ["--decoding", "speculative", "--threshold-decay", "1"],
                 ["--use-early-exit", "--threshold-decay", "-1"], ["--use-early-exit", "--confidence", "max"]):
        with pytest.raises(SystemExit):
            _client(argv)


def test_client_flags_reach_generation_over_http(gpt):
    info = ModelInfo(num_layers=NUM_LAYERS, exit_layers=[1, 2, 3])
    srv = InferenceServer(GenerationService(lambda request: generate(gpt, request), info), port=0).start()
    try:
        args = _client(["--url", srv.url + "/api", "--use-early-exit", "--threshold", "0.7", "--confidence",
                        "cosine", "--threshold-decay", "3"])
        body = {"prompts": [" ".join(map(str, PROMPTS[0]))], "tokens_to_generate": TOKENS, **early_exit_fields(args)}
        response = put_api(args.url, body)
    finally:
        srv.stop()
    want = generate_tokens(gpt, PROMPTS[:1], greedy(TOKENS), exits(0.7, confidence="cosine", threshold_decay=3.0))
    default = generate_tokens(gpt, PROMPTS[:1], greedy(TOKENS), exits(0.7))  # top1, constant threshold
    assert response["exit_layers"] == want.exit_layers != default.exit_layers
