"""Self-speculative decoding in one process (``strategies/speculative.py``, ``speculative_loop.py``,
``acceptance.py``): the acceptance rule on hand-made distributions, greedy output identical to
full-depth greedy on many prompts (batch 1 and 4), the KV cache of every layer equal to a full forward's,
the sampled first tokens distributed as the full model's softmax (chi-square), stops, and bad input."""

import pytest
import torch

from megatron.text_generation.strategies.acceptance import verify_greedy, verify_sampled
from megatron.text_generation.generation import generate, generate_tokens
from megatron.text_generation.request import EarlyExitParams, GenerationRequest, SamplingParams
from megatron.testing.generation import (
    PROMPTS, assert_cache_prefix, cache_snapshot, chi_square_pvalue, configs, engine, greedy, random_prompts,
    reference_cache, spec, tiny_vocab_engine,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

# ------------------------------------------------------------------------------------ acceptance rule

def _one_hot_logits(target, vocab=6):
    return torch.nn.functional.one_hot(torch.tensor(target), vocab).float() * 5.0


def test_greedy_rule_accepts_the_shortest_prefix_of_the_batch():
    target = [[1, 2, 3, 4], [1, 5, 3, 4], [0, 2, 5, 4]]  # the full model's argmax at positions 0..3
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    free = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])  # row 2: position 0 forced
    v = verify_greedy(_one_hot_logits(target), drafts, free)
    # row 0 accepts 3, row 1 rejects position 1, row 2 keeps its forced token then rejects position 2
    assert v.accepted == 1
    assert v.tokens[:, :2].tolist() == [[1, 2], [1, 5], [1, 2]]  # row 1 corrected, the others keep drafts
    assert v.from_draft[:, :2].tolist() == [[True, True], [True, False], [True, True]]
    everything = verify_greedy(_one_hot_logits([[1, 2, 3, 4]]), drafts[:1], free[:1])
    assert everything.accepted == 3 and everything.tokens.tolist() == [[1, 2, 3, 4]]  # plus the bonus token
    assert everything.from_draft.tolist() == [[True, True, True, False]]


def _uniforms(b, k, g):
    """The acceptance tests' and the residual draws' uniform numbers."""
    return torch.rand(b, k, generator=g, dtype=torch.float64), torch.rand(b, k + 1, generator=g, dtype=torch.float64)


def test_sampled_rule_extremes():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 3, 6, generator=g), dim=-1)
    drafts = torch.multinomial(p[:, 0], 2, replacement=True, generator=g)
    free = torch.ones(4, 2, dtype=torch.bool)
    same = verify_sampled(p, p[:, :2], drafts, free, *_uniforms(4, 2, g))  # q = p: every draft is accepted
    assert same.accepted == 2 and same.tokens[:, :2].tolist() == drafts.tolist()
    p0 = p.clone()
    p0[:, :, 0] = 0.0
    p0 /= p0.sum(-1, keepdim=True)
    q = torch.zeros(4, 2, 6)
    q[:, :, 0] = 1.0  # the draft always proposes token 0, which the full model never emits
    v = verify_sampled(p0, q, torch.zeros(4, 2, dtype=torch.long), free, *_uniforms(4, 2, g))
    assert v.accepted == 0 and (v.tokens[:, 0] != 0).all() and not v.from_draft[:, 0].any()


def test_sampled_rule_keeps_the_target_distribution_at_every_committed_position():
    """Two sequences in lock-step (row 1 often stops the batch early): row 0's committed tokens at
    positions 0 and 1 follow p_0 and p_1 although the drafts follow q."""
    g = torch.Generator().manual_seed(1)
    vocab, n = 5, 2000
    p = torch.softmax(2 * torch.randn(2, 3, vocab, generator=g), dim=-1)
    q = torch.softmax(2 * torch.randn(2, 2, vocab, generator=g), dim=-1)
    free = torch.ones(2, 2, dtype=torch.bool)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        drafts = torch.multinomial(q.reshape(4, vocab), 1, generator=g).view(2, 2)
        v = verify_sampled(p, q, drafts, free, *_uniforms(2, 2, g))
        first[v.tokens[0, 0]] += 1
        if v.accepted >= 1:
            second[v.tokens[0, 1]] += 1
    assert chi_square_pvalue(first, p[0, 0]) > 1e-3 and chi_square_pvalue(second, p[0, 1]) > 1e-3
    assert second.sum() > 200
    assert chi_square_pvalue(first, q[0, 0]) < 1e-6  # the test tells the target from the draft distribution


# --------------------------------------------------------------------------------- greedy equivalence

@pytest.mark.parametrize("arch, ee_kw", [("llama", {}), ("gpt", {"use_exit_block": True, "use_exit_norm": True})],
                         ids=["llama", "gpt-exit-block"])
def test_greedy_speculative_equals_full_depth_on_many_prompts(arch, ee_kw):
    eng = engine(*configs(arch, exits=(1, 3), **ee_kw))
    prompts = random_prompts(12, seed=3)
    full = generate_tokens(eng, prompts, greedy(8), EarlyExitParams())
    drafted = accepted = 0
    for k, layer in ((1, 3), (3, 1), (6, 3)):
        for i in range(0, len(prompts), 4):  # batch size 4, prompts of different lengths
            got = generate_tokens(eng, prompts[i:i + 4], greedy(8), spec(k, layer))
            assert got.tokens == full.tokens[i:i + 4], (k, layer, i)
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(full.logprobs[i:i + 4]),
                                       rtol=1e-4, atol=1e-4)
            stats = got.extra["speculative"]
            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
            assert all(layer_ in (layer, 4) for row in got.exit_layers for layer_ in row)
    for i in range(0, len(prompts), 3):  # batch size 1, the default draft exit (the first one)
        assert generate_tokens(eng, [prompts[i]], greedy(8), spec(4)).tokens == [full.tokens[i]]
    assert 0 < accepted < drafted  # both verdicts were exercised


def test_kv_cache_of_every_layer_equals_a_full_forward():
    """Layers <= E are cached by the drafts and reused; the verification fills the others (exit blocks
    included): at every verify step the committed prefix of every layer equals a full forward's cache."""
    eng = engine(*configs("llama", exits=(1, 2), use_exit_block=True))
    prompts = [PROMPTS[0], [9, 8, 7, 6, 5, 4]]  # same length: one reference forward for the batch
    snapshots = []

    def observe(runner, header):
        if header.mode == 4:  # MODE_VERIFY: positions before its offset are final
            snapshots.append(cache_snapshot(runner.kv, header.offset))

    got = generate_tokens(eng, prompts, greedy(9), spec(3, 2), observer=observe)
    reference = reference_cache(eng.model, torch.tensor([p + t for p, t in zip(prompts, got.tokens)]))
    assert len(snapshots) >= 3 and any(layer > 4 for layer in snapshots[-1])  # exit blocks are cached too
    for snap in snapshots:
        assert_cache_prefix(snap, reference)
    assert next(iter(snapshots[-1].values()))[0].shape[1] >= len(prompts[0]) + 5


# ------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("sampling_kw", [{}, {"temperature": 0.7, "top_k": 6}], ids=["plain", "tempered-top-k"])
def test_sampled_first_token_follows_the_full_model(sampling_kw):
    eng = tiny_vocab_engine()
    prompt, n = [3, 7, 1], 4000
    with torch.no_grad():
        out = eng.model(torch.tensor([prompt]))
    from megatron.text_generation.sampling import sampling_probs

    params = SamplingParams(tokens_to_generate=2, random_seed=11, **sampling_kw)
    p = sampling_probs(out.output[0, -1:, :12], params, 0)[0]
    q = sampling_probs(out.exit_logits[1][0, -1:, :12], params, 0)[0]
    counts = torch.zeros(12)
    for seed in (11, 12):  # each row of the batch draws independently; two seeds, n / 2 rows each
        params.random_seed = seed
        got = generate_tokens(eng, [prompt] * (n // 2), params, spec(2))
        counts += torch.bincount(torch.tensor([t[0] for t in got.tokens]), minlength=12).float()
        assert 0 < got.extra["speculative"]["acceptance_rate"] < 1
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, q) < 1e-6  # the drafts alone would have been caught
    assert 0.5 * float((counts / n - p).abs().sum()) < 0.05  # total variation


def test_sampling_is_reproducible_with_a_seed():
    eng = engine(*configs("llama", exits=(1, 3)))
    params = SamplingParams(tokens_to_generate=6, top_p=0.9, random_seed=4)
    a, b = (generate_tokens(eng, PROMPTS, params, spec(3)).tokens for _ in range(2))
    assert a == b and all(len(t) == 6 for t in a)


# ------------------------------------------------------------------------------------- stops, result

def test_stop_tokens_and_sequences_stop_where_full_depth_stops():
    eng = engine(*configs("llama", exits=(1, 3)))
    full = generate_tokens(eng, PROMPTS, greedy(8), EarlyExitParams()).tokens
    stop = full[0][3]
    want = generate_tokens(eng, PROMPTS, greedy(8, stop_token_ids=[stop]), EarlyExitParams()).tokens
    assert generate_tokens(eng, PROMPTS, greedy(8, stop_token_ids=[stop]), spec(4, 3)).tokens == want
    assert want[0][-1] == stop and len(want[0]) == 4
    text = " ".join(map(str, PROMPTS[1]))
    stop_seq = " ".join(map(str, full[1][2:4]))
    requests = [GenerationRequest([text], greedy(8, stop_sequences=[stop_seq]), ee) for ee in (EarlyExitParams(),
                                                                                                spec(4, 1))]
    plain, fast = (generate(eng, r) for r in requests)
    assert fast.texts == plain.texts and stop_seq not in fast.texts[0]
    assert fast.stats["speculative"]["draft_exit_layer"] == 1 and plain.stats == {}
    assert 0.0 <= fast.stats["speculative"]["acceptance_rate"] <= 1.0


def test_decoding_modes_and_bad_parameters_are_named():
    eng = engine(*configs("llama", exits=(1, 3)))
    old_style = generate_tokens(eng, PROMPTS, greedy(4), EarlyExitParams(use_early_exit=True, early_exit_thres=0.0))
    new_style = generate_tokens(eng, PROMPTS, greedy(4), EarlyExitParams(decoding="early_exit", early_exit_thres=0.0))
    assert old_style.exit_layers == new_style.exit_layers == [[1] * 4] * 3
    for ee, match in [
        (spec(3, 2), "draft_exit_layer 2 is not an exit"),
        (spec(0), "num_speculative_tokens"),
        (spec(3, use_early_exit=True), "use_early_exit"),
        (EarlyExitParams(decoding="fast"), "decoding must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate_tokens(eng, PROMPTS, greedy(4), ee)
    with pytest.raises(ValueError, match="beam_width"):
        generate_tokens(eng, PROMPTS[:1], SamplingParams(tokens_to_generate=3, beam_width=2), spec())
    with pytest.raises(ValueError, match="needs a model with exits"):
        generate_tokens(engine(*configs("llama", exits=())), PROMPTS, greedy(4), spec())
