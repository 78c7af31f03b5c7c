"""The model's inference interface (``megatron/model/inference.py``) and the shared exit rule: a layer range
resumes exactly where another stopped, exit views compute their vocabulary projection only when asked,
exits nobody consults run none of their parts, a confidence measure added to ``MEASURE_RULES`` decides
generation from the hidden state alone, and decoding and scoring share one rule."""

import pytest
import torch

from megatron.core.transformer import InferenceParams
from megatron.evaluation.scoring import ExitScorer
from megatron.text_generation import confidence as conf_mod
from megatron.text_generation.confidence import Measure
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams

from megatron.testing.generation import PROMPTS, configs, engine, exits, greedy, oracle_greedy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

@pytest.mark.parametrize("arch, ee_kw", [("llama", {"use_exit_block": True}), ("gpt", {"use_exit_mlp": True})])
def test_a_layer_range_resumes_where_another_stopped(arch, ee_kw):
    eng = engine(*configs(arch, exits=(1, 3), untie_exit_output_weights=True, **ee_kw))
    model, ids = eng.model, torch.tensor(PROMPTS[:1] * 2)
    whole_kv, split_kv = InferenceParams(2, 8), InferenceParams(2, 8)
    whole = model.infer(ids, inference_params=whole_kv, exits=(1, 3))
    first = model.infer(ids, inference_params=split_kv, layers=(0, 1), exits=(1,))
    assert first.final is None and first.hidden.shape == (6, 2, 32)
    rest = model.infer(None, hidden_states=first.hidden, inference_params=split_kv, layers=(1, 4), exits=(3,))
    torch.testing.assert_close(rest.final.logits(), whole.final.logits(), rtol=1e-5, atol=1e-6)
    for layer, view in ((1, first.exits[1]), (3, rest.exits[3])):
        torch.testing.assert_close(view.logits(), whole.exits[layer].logits(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(view.hidden, whole.exits[layer].hidden, rtol=1e-5, atol=1e-6)
    assert whole_kv.key_value_memory_dict.keys() == split_kv.key_value_memory_dict.keys()
    for layer, (k, v) in whole_kv.key_value_memory_dict.items():
        torch.testing.assert_close(split_kv.key_value_memory_dict[layer][0], k, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_states"):
        model.infer(ids, inference_params=None, layers=(1, 4))


def test_views_project_only_when_asked(projections):
    eng = engine(*configs("llama", exits=(1, 3)))
    out = eng.model.infer(torch.tensor(PROMPTS[:1]), inference_params=None, exits=(1, 3), num_last=1)
    assert projections == {} and out.exits[1].hidden.shape == (1, 32)
    first = out.exits[1].logits()
    assert out.exits[1].logits() is first and projections == {1: 1}  # computed once, cached
    banned = out.exits[3].derive(lambda x: x * 0)
    assert projections == {1: 1} and not banned.computed()
    assert torch.equal(banned.logits(), torch.zeros_like(first)) and projections == {1: 1, 3: 1}


def test_exits_nobody_consults_run_none_of_their_parts():
    eng = engine(*configs("gpt", exits=(1, 2, 3), use_exit_block=True, use_exit_mlp=True))
    branches = []
    for layer in eng.model.language_model.encoder.layers:
        if hasattr(layer, "exit_block"):
            layer.mlp.branch.register_forward_hook(lambda m, args, out, n=layer.layer_number: branches.append(n))
    cached = {}

    def observe(runner, header):
        cached.update({k: None for k in runner.kv.key_value_memory_dict})

    for measure, expect in (("top1", {3}), ("cosine", {1, 2, 3})):
        branches.clear()
        cached.clear()
        generate_tokens(eng, PROMPTS[:1], greedy(3), exits(0.5, confidence=measure, exit_layers=[3]), observer=observe)
        # cosine at exit 3 compares with exit 2's hidden state: exits below the allowed one stay computed
        assert set(branches) == expect, measure
        assert {k for k in cached if k > 4} == {e + 4 for e in expect}, measure  # exit blocks' KV slots
    branches.clear()
    generate_tokens(eng, PROMPTS[:1], greedy(3), EarlyExitParams())
    assert branches == []  # full depth: no exit computes anything


def test_cosine_projects_only_where_a_token_is_chosen(projections):
    """Batch 1: under a hidden-state measure every generated token costs exactly one vocabulary projection,
    at the exit it left at or at the final head; a logit measure projects at every exit it consults."""
    eng = engine(*configs("gpt", exits=(1, 2, 3)))
    out = generate_tokens(eng, PROMPTS[:1], greedy(8), exits(0.7, confidence="cosine"))
    layers = out.exit_layers[0]
    assert len(set(layers)) > 1  # some tokens left early, others did not
    assert sum(projections.values()) == len(layers)
    assert projections.get(4, 0) == layers.count(4)
    projections.clear()
    out = generate_tokens(eng, PROMPTS[:1], greedy(8), exits(0.3))
    consulted = sum({1: 1, 2: 2, 3: 3, 4: 4}[layer] for layer in out.exit_layers[0])  # exits 1..3, then the head
    assert sum(projections.values()) == consulted


def test_a_new_measure_decides_from_the_hidden_state(monkeypatch, projections):
    """What a learned estimator plugs into: a Measure scoring the view's hidden state (here a fixed probe)
    decides which tokens leave, and only the exits that fire project."""
    eng = engine(*configs("gpt", exits=(1, 2, 3)))
    probe = torch.randn(32, generator=torch.Generator().manual_seed(0))
    seen = []

    def score(view, prev, temperature):
        seen.append(view.layer)
        return torch.sigmoid(4 * torch.nn.functional.cosine_similarity(view.hidden.float(), probe[None], dim=-1))

    monkeypatch.setitem(conf_mod.MEASURE_RULES, "probe", Measure("probe", score))
    out = generate_tokens(eng, PROMPTS[:1], greedy(6), exits(0.7, confidence="probe"))
    layers = out.exit_layers[0]
    assert len(set(layers)) > 1 and sum(projections.values()) == len(layers)
    # the tokens are those of the exit each one left at
    ids = list(PROMPTS[0])
    for token, layer in zip(out.tokens[0], layers):
        assert token == oracle_greedy(eng.model, ids, 1, exit_layer=None if layer == 4 else layer)[0]
        ids.append(token)
    assert set(seen) == {1, 2, 3}


@pytest.mark.parametrize("measure", ["top1", "cosine"])
def test_scoring_and_decoding_share_the_rule(measure):
    """Teacher forcing the generated tokens, the scorer picks for every generated position the exit that
    generation left at (the same rule decides, with KV recomputation every layer sees the same prefix)."""
    eng = engine(*configs("gpt", exits=(1, 2, 3)))
    thres = {"top1": 0.3, "cosine": 0.7}[measure]
    out = generate_tokens(eng, PROMPTS[:1], greedy(6), exits(thres, "recompute", confidence=measure))
    scorer = ExitScorer([eng.model], threshold=thres, measure=measure)
    scored = scorer.score(torch.tensor([PROMPTS[0] + out.tokens[0]]))
    n = len(PROMPTS[0])
    assert scored.exit_layer[0, n - 1: n - 1 + 6].tolist() == out.exit_layers[0]
