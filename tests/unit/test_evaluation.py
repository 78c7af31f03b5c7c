"""The lm-eval adapter over a tiny random model: log-likelihoods equal a direct computation from the
model's own full forward (final head and exit heads, batched with padding, split stages in one process),
threshold scoring picks each position's first confident exit, rolling windows score every token once,
generate_until equals greedy decoding by full forwards (full depth and truncated at an exit)."""

import math

import pytest
import torch

from megatron.evaluation import HAVE_LM_EVAL, EarlyExitLM, Request
from megatron.text_generation.confidence import confidence

from megatron.testing.evaluation import (
    EXITS, NUM_LAYERS, TASK, continuation_logprob, full_logprobs, greedy_oracle, make_lm,
)

REQUESTS = [("1 2 3", " 4"), ("7 8", " 9 10 11"), ("5", " 6 7"), ("", " 12 13"), ("3 3 3 3 3 3", " 3")]


def _ids(lm, text):
    return lm.tok_encode(text)


def _oracle(lm, context, continuation, layer=None):
    ctx = _ids(lm, context) if context else [lm.eot_token_id]
    return continuation_logprob(lm, ctx, _ids(lm, continuation), layer)


@pytest.mark.parametrize("layer", [None, 1, 3])
def test_loglikelihood_equals_full_forward(layer):
    lm = make_lm(exit_layer=layer, batch_size=3)  # 5 requests: a padded batch of 3, then 2
    got = lm.loglikelihood([Request(r) for r in REQUESTS])
    for (context, continuation), (lp, greedy) in zip(REQUESTS, got):
        want_lp, want_greedy = _oracle(lm, context, continuation, layer)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    assert lm.stats()["mean_scored_exit_layer"] == (layer or NUM_LAYERS)


def test_exit_layer_selection_changes_the_numbers():
    values = {layer: [lp for lp, _ in make_lm(exit_layer=layer).loglikelihood(REQUESTS)] for layer in (None, 1, 3)}
    for a, b in ((None, 1), (None, 3), (1, 3)):
        assert all(abs(x - y) > 1e-3 for x, y in zip(values[a], values[b])), (a, b)


def test_split_stages_in_one_process_score_the_same():
    single, split = make_lm(exit_layer=3), make_lm(pp_in_process=2, exit_layer=3)
    for (a, _), (b, _) in zip(single.loglikelihood(REQUESTS), split.loglikelihood(REQUESTS)):
        assert a == pytest.approx(b, abs=1e-5)
    # exit 1 sits on the first of two stages: the second is not run at all
    first = make_lm(pp_in_process=2, exit_layer=1)
    _, _, final = first.scorer.forward(torch.tensor([[1, 2, 3]]))
    assert final is None


@pytest.mark.parametrize("measure", ["top1", "entropy", "cosine"])
def test_threshold_scoring_takes_first_confident_exit(measure):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    lm = make_lm(early_exit_thres=0.5, confidence=measure)
    logits, hidden, _ = lm.scorer.forward(torch.tensor([ids]))
    thres = float(torch.quantile(confidence(measure, logits[3][0], prev_hidden=hidden[1][0], hidden=hidden[3][0]),
                                 0.5))  # a threshold some positions pass and some do not
    lm = make_lm(early_exit_thres=thres, confidence=measure)
    scored = lm.scorer.score(torch.tensor([ids]))
    oracle = {layer: full_logprobs(lm, ids, None if layer == NUM_LAYERS else layer) for layer in (*EXITS, NUM_LAYERS)}
    layers = []
    for pos in range(len(ids)):
        chosen = NUM_LAYERS
        for layer in EXITS:
            conf = float(confidence(measure, logits[layer][0, pos:pos + 1], hidden=hidden[layer][0, pos:pos + 1],
                                    prev_hidden=None if layer == 1 else hidden[1][0, pos:pos + 1]))
            if conf >= thres:
                chosen = layer
                break
        layers.append(chosen)
        torch.testing.assert_close(scored.logprobs[0, pos], oracle[chosen][pos], rtol=1e-4, atol=1e-4)
    assert scored.exit_layer[0].tolist() == layers
    assert len(set(layers)) > 1, layers


def test_threshold_bounds_match_exit_and_full_depth():
    requests = REQUESTS[:3]
    never = make_lm(early_exit_thres=1.0).loglikelihood(requests)
    full = make_lm().loglikelihood(requests)
    first = make_lm(early_exit_thres=0.0).loglikelihood(requests)
    exit1 = make_lm(exit_layer=1).loglikelihood(requests)
    only3 = make_lm(early_exit_thres=0.0, exit_layers=[3]).loglikelihood(requests)
    exit3 = make_lm(exit_layer=3).loglikelihood(requests)
    for pairs in ((never, full), (first, exit1), (only3, exit3)):
        for (a, _), (b, _) in zip(*pairs):
            assert a == pytest.approx(b, abs=1e-5)


def test_rolling_windows_score_every_token_once():
    lm = make_lm(max_length=4)
    ids = list(range(1, 12))
    windows = lm.rolling_windows(ids)
    targets = [t for seq, k in windows for t in seq[1:][-k:]]
    assert targets == ids
    assert all(len(seq) - 1 <= 4 for seq, _ in windows)
    assert windows[-1][0][:-1] == ids[-5:-1]  # the last window keeps a full context
    text = " ".join(map(str, ids))
    (total,) = lm.loglikelihood_rolling([Request((text,))])
    assert total == pytest.approx(sum(lp for lp, _ in lm._score_windows(windows)), abs=1e-5)


def test_rolling_equals_full_forward_when_it_fits():
    lm = make_lm()
    ids = [5, 3, 8, 13, 21, 3, 4]
    (total,) = lm.loglikelihood_rolling([(" ".join(map(str, ids)),)])  # plain tuples work too
    lp = full_logprobs(lm, [lm.eot_token_id] + ids[:-1])
    assert total == pytest.approx(float(lp.gather(-1, torch.tensor(ids).unsqueeze(-1)).sum()), abs=1e-4)


def test_long_context_is_cut_from_the_left():
    lm = make_lm(max_length=6)
    context = " ".join(str(i) for i in range(1, 20))
    (lp, _), = lm.loglikelihood([(context, " 20")])
    want, _ = continuation_logprob(lm, list(range(14, 20)), [20])
    assert lp == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("layer", [None, 3])
def test_generate_until_equals_greedy_full_forwards(layer):
    lm = make_lm(exit_layer=layer, batch_size=2)
    prompts = ["1 2 3", "7 8", "30"]  # batches of 2 and 1; prompts of different lengths share a batch
    got = lm.generate_until([Request((p, {"until": ["\n"], "max_gen_toks": 4})) for p in prompts])
    for prompt, text in zip(prompts, got):
        ids = greedy_oracle(lm, _ids(lm, prompt), 4, layer)
        shown = ids[:-1] if ids and ids[-1] == lm.tokenizer.eod else ids
        assert text == " ".join(map(str, shown))
    assert lm.stats()["mean_generated_exit_layer"] == (layer or NUM_LAYERS)


def test_generate_until_cuts_at_until():
    lm = make_lm()
    (full,) = lm.generate_until([("1 2 3", {"max_gen_toks": 4})])
    pieces = full.split(" ")
    assert len(pieces) >= 3
    (cut,) = lm.generate_until([("1 2 3", {"until": " " + pieces[2], "max_gen_toks": 4})])
    assert full.startswith(cut) and len(cut) < len(full)


class _Recorder:
    """A stand-in for generate that records requests and answers each prompt with fixed text."""

    def __init__(self, answer):
        self.requests, self.answer = [], answer

    def __call__(self, request):
        self.requests.append(request)
        n = len(request.prompts)
        return type("R", (), {"texts": [self.answer] * n, "exit_layers": [[1, 3]] * n})()


def test_generate_until_batches_by_gen_kwargs_and_maps_them():
    rec = _Recorder("5 6 END 7")
    lm = make_lm(early_exit_thres=0.7, confidence="margin", batch_size=2, max_length=8, generate_fn=rec)
    a = {"until": ["END"], "max_gen_toks": 3}
    b = {"until": "7", "max_gen_toks": 2, "do_sample": True, "temperature": 0.5, "top_k": 4, "seed": 9}
    long_context = " ".join(str(i) for i in range(1, 12))
    out = lm.generate_until([("1", a), ("2", b), ("3", a), (long_context, a)])
    assert out == ["5 6 ", "5 6 END ", "5 6 ", "5 6 "]
    assert [r.prompts for r in rec.requests] == [["1", "3"], ["7 8 9 10 11"], ["2"]]  # context: the last 8 - 3 tokens
    first, sampled = rec.requests[0], rec.requests[2]
    assert first.sampling.greedy and first.sampling.stop_sequences == ["END"] and first.sampling.tokens_to_generate == 3
    assert not sampled.sampling.greedy and (sampled.sampling.top_k, sampled.sampling.temperature) == (4, 0.5)
    assert sampled.sampling.random_seed == 9
    ee = first.early_exit
    assert (ee.use_early_exit, ee.early_exit_thres, ee.confidence) == (True, 0.7, "margin")
    assert lm.stats()["mean_generated_exit_layer"] == 2.0
    with pytest.raises(ValueError, match="gen_kwargs.*'beams'"):
        lm.generate_until([("1", {"beams": 2})])


def test_bad_settings_name_the_field():
    # checked when the adapter is built, before any request
    with pytest.raises(ValueError, match="exit_layer 2 is not an exit"):
        make_lm(exit_layer=2)
    with pytest.raises(ValueError, match="exclude each other"):
        make_lm(exit_layer=1, early_exit_thres=0.5)
    with pytest.raises(ValueError, match="confidence: unknown measure"):
        make_lm(early_exit_thres=0.5, confidence="max")
    with pytest.raises(ValueError, match="early_exit_thres must lie in"):
        make_lm(early_exit_thres=1.5)
    with pytest.raises(ValueError, match=r"exit_layers \[2\] are not exits"):
        make_lm(early_exit_thres=0.5, exit_layers=[2])
    with pytest.raises(ValueError, match="no tokens"):
        make_lm().loglikelihood([("1 2", "")])
    with pytest.raises(ValueError, match="batch_size"):
        make_lm(batch_size=0)


def test_lm_eval_interface():
    lm = make_lm()
    assert (lm.rank, lm.world_size) == (0, 1)
    if HAVE_LM_EVAL:
        from lm_eval.api.model import LM

        assert isinstance(lm, LM)
    assert all(callable(getattr(EarlyExitLM, m)) for m in ("loglikelihood", "loglikelihood_rolling", "generate_until"))
    # the five-item task's requests as lm-eval would send them: one per (item, choice)
    requests = [Request((it["context"], c)) for it in TASK for c in it["choices"]]
    got = lm.loglikelihood(requests)
    assert len(got) == len(requests) and all(lp < 0 and math.isfinite(lp) for lp, _ in got)


def test_encode_pair_follows_lm_eval_with_a_real_tokenizer():
    from megatron.tokenizer.bundled import GPT2_MERGE_FILE, GPT2_VOCAB_FILE
    from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer

    tok = GPT2BPETokenizer(GPT2_VOCAB_FILE, GPT2_MERGE_FILE)
    lm = make_lm()
    lm.tokenizer = tok
    ctx, cont = lm._encode_pair("The cat", " sat down")
    assert ctx == tok.tokenize("The cat") and cont == tok.tokenize(" sat down")
    # the trailing space moves to the continuation, where GPT-2 BPE keeps it on the word
    assert lm._encode_pair("The cat ", "sat down") == (ctx, cont)
    assert lm._encode_pair("", " sat") == ([tok.eod], tok.tokenize(" sat"))
