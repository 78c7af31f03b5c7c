"""Single-process generation (``megatron/text_generation``): greedy parity with Hugging Face, early exit
by methods A and B (tokens and KV caches against cache-free oracles), batches of different prompt
lengths, sampling reproducibility, stop tokens and sequences, scoring and beam search."""

from dataclasses import replace

import pytest
import torch

from megatron.model import EarlyExitGPTModel
from megatron.model.hf_convert import config_from_hf, full_from_hf
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import shard_state_dict
from megatron.core.parallel_state import ParallelState
from megatron.config import EarlyExitConfig
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate, generate_tokens
from megatron.text_generation.request import EarlyExitParams, GenerationRequest, SamplingParams
from megatron.tokenizer.null import NullTokenizer

from megatron.testing.generation import (
    PROMPTS, VOCAB, assert_cache_prefix, cache_snapshot, configs, engine, exits, greedy, oracle_greedy,
    reference_cache,
)

transformers = pytest.importorskip("transformers")


def _hf_models():
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    yield "llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, **common)
    yield "gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)


@pytest.mark.parametrize("name, cls, hf_cfg", list(_hf_models()), ids=["llama", "gpt2"])
def test_greedy_equals_transformers_generate(name, cls, hf_cfg):
    torch.manual_seed(0)
    hf = cls(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    cfg = config_from_hf(hf_cfg, make_vocab_size_divisible_by=32)
    state = ParallelState.single()
    model = EarlyExitGPTModel(cfg, EarlyExitConfig(), state=state)
    full = full_from_hf(hf.state_dict(), cfg)
    model.load_state_dict(shard_state_dict(full, cfg, 1, 0, partition(cfg.num_layers, 1, 1, []), 0, 0))
    eng = InferenceEngine([model], state, NullTokenizer(VOCAB), cfg, EarlyExitConfig())
    ours = generate_tokens(eng, PROMPTS, greedy(8), EarlyExitParams()).tokens
    for prompt, got in zip(PROMPTS, ours):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("method", ["recompute", "pipeline"])
def test_threshold_one_equals_plain_greedy(arch, method):
    eng = engine(*configs(arch, exits=(1, 3)))
    plain = generate_tokens(eng, PROMPTS, greedy(), EarlyExitParams())
    never = generate_tokens(eng, PROMPTS, greedy(), exits(1.0, method))
    assert never.tokens == plain.tokens
    assert all(layer == 4 for row in never.exit_layers for layer in row)
    for prompt, got in zip(PROMPTS, plain.tokens):
        assert got == oracle_greedy(eng.model, prompt, 6)


@pytest.mark.parametrize("method, cap", [("recompute", None), ("recompute", 2), ("pipeline", None)])
def test_threshold_zero_follows_the_exit_head_and_keeps_the_cache_complete(method, cap):
    eng = engine(*configs("llama", exits=(2,), use_exit_block=True, use_exit_norm=True))
    snapshots = []

    def observe(runner, header):  # positions before the header's offset are complete in every layer
        snapshots.append(cache_snapshot(runner.kv, header.offset))

    out = generate_tokens(eng, PROMPTS[:1], greedy(7), exits(0.0, method, recompute_cap=cap), observer=observe)
    assert out.tokens[0] == oracle_greedy(eng.model, PROMPTS[0], 7, exit_layer=2)
    assert out.exit_layers == [[2] * 7]
    reference = reference_cache(eng.model, torch.tensor([PROMPTS[0] + out.tokens[0]]))
    for snap in snapshots:
        assert_cache_prefix(snap, reference)
    depth = max(next(iter(s.values()))[0].shape[1] for s in snapshots)
    if method == "pipeline" or cap is not None:  # the window was back-filled along the way
        assert depth >= len(PROMPTS[0]) + 4


def _method_a_snapshots(eng, **ee_kw):
    """Method A without a window cap, at a threshold where tokens 1, 2 exit at layer 2 and token 3 needs the
    full depth: the third step re-feeds positions 0..7 at offset 0 and back-fills the layers the first two
    skipped. -> (tokens, exit layers, each step's (offset, n), snapshots of every layer up to the offset)."""
    snapshots, steps = [], []

    def observe(runner, header):  # positions before the header's offset must be complete in every layer
        steps.append((header.offset, header.n))
        snapshots.append(cache_snapshot(runner.kv, header.offset))

    out = generate_tokens(eng, PROMPTS[:1], greedy(8), exits(0.1, "recompute", **ee_kw), observer=observe)
    return out.tokens[0], out.exit_layers[0], steps, snapshots


def _check_snapshots(model, tokens, snapshots):
    reference = reference_cache(model, torch.tensor([PROMPTS[0] + tokens]))
    for snap in snapshots:
        assert_cache_prefix(snap, reference)


def test_method_a_back_fills_the_layers_exits_skipped(monkeypatch):
    eng = engine(*configs("llama", exits=(2,), use_exit_block=True, use_exit_norm=True))
    tokens, layers, steps, snapshots = _method_a_snapshots(eng, recompute_cap=None)
    assert layers[:3] == [2, 2, 4] and 2 in layers[3:] and 4 in layers[3:]
    assert steps[2] == (0, 8) and any(n > 1 for _, n in steps[3:])  # windows re-fed, later ones too
    deep = [snap for snap in snapshots if snap.get(4) is not None and snap[4][0].shape[1] >= 12]
    assert deep and {3, 4, 6} <= set(deep[-1])  # the layers after the exit, exit block (6) included, checked
    _check_snapshots(eng.model, tokens, snapshots)
    # the check is not vacuous: feeding only the newest position (no back-filling) leaves holes it finds
    from megatron.text_generation.strategies.token_by_token import TokenRunner

    real = TokenRunner.drive

    def no_backfill(runner, header, payload, ids):
        last = header.offset + header.n - 1
        return real(runner, replace(header, offset=last, n=1), payload, ids[:, -1:])

    monkeypatch.setattr(TokenRunner, "drive", no_backfill)
    tokens, _, _, snapshots = _method_a_snapshots(eng, recompute_cap=None)
    with pytest.raises(AssertionError):
        _check_snapshots(eng.model, tokens, snapshots)


def test_method_a_window_is_bounded_by_default():
    """Every token exits (threshold 0): by default a full-depth step comes after RECOMPUTE_CAP skipping
    ones, so a step re-feeds at most RECOMPUTE_CAP + 1 positions past the last full-depth pass (the first
    window also holds the prompt); EE-LLM's window grew without bound."""
    from megatron.text_generation.request import RECOMPUTE_CAP, parse_api_request

    assert EarlyExitParams().recompute_cap == RECOMPUTE_CAP == 16
    assert parse_api_request({"prompts": "1", "use_early_exit": True}).early_exit.recompute_cap == RECOMPUTE_CAP
    eng = engine(*configs("gpt", exits=(1,), num_layers=2))
    windows = []
    ee = EarlyExitParams(use_early_exit=True, early_exit_thres=0.0)
    out = generate_tokens(eng, [[3, 1, 4]], greedy(40), ee, observer=lambda runner, h: windows.append(h.n))
    assert out.exit_layers == [[1] * 40]
    assert max(windows) == 3 + RECOMPUTE_CAP and windows[RECOMPUTE_CAP] == 3 + RECOMPUTE_CAP  # the forced pass
    assert max(windows[RECOMPUTE_CAP + 1:]) == RECOMPUTE_CAP + 1
    unbounded = []
    generate_tokens(eng, [[3, 1, 4]], greedy(40), replace(ee, recompute_cap=None),
                    observer=lambda runner, h: unbounded.append(h.n))
    assert max(unbounded) == 3 + 39  # the whole sequence, re-fed at every step


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("ee", [None, exits(0.3, "recompute"), exits(0.3, "pipeline", exit_layers=[1, 3])],
                         ids=["full", "A", "B"])
def test_batch_of_different_lengths_equals_each_prompt_alone(arch, ee):
    eng = engine(*configs(arch, exits=(1, 2, 3)))
    ee = ee or EarlyExitParams()
    batch = generate_tokens(eng, PROMPTS, greedy(8), ee)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_tokens(eng, [prompt], greedy(8), ee)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.exit_layers[i] == alone.exit_layers[0]
    layers = {layer for row in batch.exit_layers for layer in row}
    if ee.use_early_exit:  # a meaningful mix: some tokens exit, others run to full depth
        assert 4 in layers and len(layers) > 1
        assert layers <= set(ee.exit_layers or [1, 2, 3]) | {4}


def test_methods_a_and_b_agree_and_exits_are_per_sequence():
    eng = engine(*configs("gpt", exits=(1, 2, 3)))
    a = generate_tokens(eng, PROMPTS, greedy(8), exits(0.35, "recompute"))
    b = generate_tokens(eng, PROMPTS, greedy(8), exits(0.35, "pipeline"))
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
    # at some step the sequences of the batch left at different layers
    assert any(len({row[j] for row in a.exit_layers}) > 1 for j in range(8))


def test_sampling_is_reproducible_with_a_seed():
    eng = engine(*configs("llama"))
    params = dict(tokens_to_generate=8, top_k=20, temperature=1.5)
    first = generate_tokens(eng, PROMPTS, SamplingParams(random_seed=7, **params), EarlyExitParams())
    again = generate_tokens(eng, PROMPTS, SamplingParams(random_seed=7, **params), EarlyExitParams())
    other = generate_tokens(eng, PROMPTS, SamplingParams(random_seed=8, **params), EarlyExitParams())
    assert first.tokens == again.tokens and first.tokens != other.tokens
    nucleus = SamplingParams(tokens_to_generate=6, top_p=0.9, top_p_decay=0.5, top_p_bound=1e-6, random_seed=3)
    assert generate_tokens(eng, PROMPTS, nucleus, exits(0.3)).tokens == \
        generate_tokens(eng, PROMPTS, nucleus, exits(0.3)).tokens
    top1 = generate_tokens(eng, PROMPTS, SamplingParams(tokens_to_generate=6, top_k=1), EarlyExitParams())
    assert top1.tokens == generate_tokens(eng, PROMPTS, greedy(), EarlyExitParams()).tokens


def test_stop_tokens_eod_stop_sequences_echo_and_logprobs():
    eng = engine(*configs("gpt"))
    free = generate_tokens(eng, PROMPTS, greedy(6), EarlyExitParams())
    stop = free.tokens[1][2]
    stopped = generate_tokens(eng, PROMPTS, greedy(6, stop_token_ids=[stop]), EarlyExitParams())
    assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    prompt = " ".join(map(str, PROMPTS[0]))
    res = generate(eng, GenerationRequest([prompt], greedy(6, logprobs=True, echo_prompts=True)))
    assert res.tokens[0] == PROMPTS[0] + free.tokens[0]
    assert res.texts[0] == " ".join(map(str, PROMPTS[0] + free.tokens[0]))
    assert len(res.logprobs[0]) == len(res.tokens[0]) - 1 and res.exit_layers == [[4] * 6]
    toks = free.tokens[0]
    stop = " " + str(toks[-1])
    text = " ".join(map(str, toks))
    needed = next(j for j in range(1, 7) if stop in " ".join(map(str, toks[:j])))
    res = generate(eng, GenerationRequest([prompt], greedy(6, stop_sequences=[stop])))
    assert res.texts[0] == text[: text.find(stop)] and res.tokens[0] == toks[:needed]


def test_scoring_logprobs_equal_a_full_forward():
    eng = engine(*configs("llama", exits=(2,)))
    texts = [" ".join(map(str, p)) for p in PROMPTS]
    res = generate(eng, GenerationRequest(texts, SamplingParams(tokens_to_generate=0)))
    for prompt, lp in zip(PROMPTS, res.logprobs):
        with torch.no_grad():
            logits = eng.model(torch.tensor([prompt])).output[0, :-1, :VOCAB]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lp), want, rtol=1e-5, atol=1e-5)
    plain = generate_tokens(eng, PROMPTS, greedy(5, logprobs=True), EarlyExitParams())
    for prompt, toks, lps in zip(PROMPTS, plain.tokens, plain.logprobs):
        with torch.no_grad():
            logits = eng.model(torch.tensor([prompt + toks])).output[0, len(prompt) - 1:-1, :VOCAB]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), want, rtol=1e-4, atol=1e-5)


def test_beam_search():
    eng = engine(*configs("gpt"))
    plain = generate_tokens(eng, PROMPTS[:1], greedy(6, logprobs=True), EarlyExitParams())
    one = generate_tokens(eng, PROMPTS[:1], SamplingParams(tokens_to_generate=6, beam_width=1), EarlyExitParams())
    assert one.tokens == plain.tokens
    wide = generate_tokens(eng, PROMPTS[:1], SamplingParams(tokens_to_generate=6, beam_width=4, length_penalty=0.0),
                           EarlyExitParams())
    scores = wide.extra["scores"]
    assert len(wide.tokens) == 4 and scores == sorted(scores, reverse=True)
    assert scores[0] >= sum(plain.logprobs[0]) - 1e-5  # the beam finds at least greedy's likelihood
    with pytest.raises(ValueError, match="beam_width"):
        generate_tokens(eng, PROMPTS, SamplingParams(tokens_to_generate=4, beam_width=2), EarlyExitParams())


def test_bad_early_exit_parameters_are_named():
    eng = engine(*configs("gpt", exits=(2,)))
    with pytest.raises(ValueError, match="exit_layers"):
        generate_tokens(eng, PROMPTS, greedy(), exits(0.5, exit_layers=[3]))
    with pytest.raises(ValueError, match="method"):
        generate_tokens(eng, PROMPTS, greedy(), exits(0.5, "fastest"))
    with pytest.raises(ValueError, match="recompute_cap"):
        generate_tokens(eng, PROMPTS, greedy(), exits(0.5, recompute_cap=0))
    with pytest.raises(ValueError, match="learned positions"):
        generate_tokens(eng, PROMPTS, greedy(64), EarlyExitParams())


def test_print_max_prob_reports_each_evaluated_exit_once(capsys):
    eng = engine(*configs("gpt", exits=(1, 3)))
    generate_tokens(eng, PROMPTS[:1], greedy(3), exits(1.0, exit_layers=[3]))
    assert capsys.readouterr().out == ""  # off: nothing printed
    generate_tokens(eng, PROMPTS[:1], greedy(3), exits(1.0, exit_layers=[3], print_max_prob=True))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["layer [3", "layer [4"] * 3  # exit 1 is excluded


def test_exit_temperature_applies_to_the_confidence_only_when_asked():
    eng = engine(*configs("gpt", exits=(1, 3), exit_layer_temperature=[50.0, 50.0]))
    raw = generate_tokens(eng, PROMPTS, greedy(), exits(0.3))
    tempered = generate_tokens(eng, PROMPTS, greedy(), exits(0.3, use_temperature=True))
    assert any(layer != 4 for row in raw.exit_layers for layer in row)
    assert all(layer == 4 for row in tempered.exit_layers for layer in row)  # flattened: nothing is confident

