"""Self-speculative decoding under pipeline and tensor parallelism (gloo): greedy output equals the
single-process full-depth output for batches of 1 and 4 with the draft exit on any stage; with pp = 2 the
KV cache of both stages equals a full forward's at every verify step, and sampling (draft distributions
sent from the exit's stage to the last stage) still follows the full model's distribution; every tensor
parallel rank draws the same samples."""

import pytest
import torch

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.messages import MODE_VERIFY
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, SamplingParams

from megatron.testing.generation import (
    PROMPTS, assert_cache_prefix, cache_snapshot, chi_square_pvalue, configs, engine, greedy, random_prompts,
    reference_cache, spec, tiny_vocab_engine,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

EXITS = (1, 2, 3)
MANY = random_prompts(8, seed=5)
SAMPLED = SamplingParams(tokens_to_generate=5, top_k=8, random_seed=9)
TINY_PROMPT, TINY_ROWS = [3, 7, 1], 1500


def _greedy_runs(eng, layers):
    out = {}
    for layer in layers:
        out[(layer, 4)] = [generate_tokens(eng, MANY[i:i + 4], greedy(7), spec(3, layer)).tokens for i in (0, 4)]
        out[(layer, 1)] = [generate_tokens(eng, [MANY[i]], greedy(7), spec(2, layer)).tokens[0] for i in (1, 6)]
    out["sampled"] = generate_tokens(eng, PROMPTS, SAMPLED, spec(2, layers[0])).tokens
    return out


def _kv_run(state):
    eng = engine(*configs("llama", exits=(1,), use_exit_block=True), state=state)
    snapshots = []

    def observe(runner, header):
        if header.mode == MODE_VERIFY:
            snapshots.append(cache_snapshot(runner.kv, header.offset))

    got = generate_tokens(eng, PROMPTS[:1], greedy(8), spec(3, 1), observer=observe)
    return got.tokens[0], snapshots


def _worker(rank, world, tp, pp, layers):
    torch.set_num_threads(1)
    state = ParallelState.build(ParallelDims(tp=tp, pp=pp))
    out = _greedy_runs(engine(*configs("gpt", exits=EXITS), state=state), layers)
    if pp == 2 and tp == 1:
        out["kv"] = _kv_run(state)
        tiny = tiny_vocab_engine(state)
        out["tiny"] = generate_tokens(tiny, [TINY_PROMPT] * TINY_ROWS, SamplingParams(tokens_to_generate=2,
                                                                                      random_seed=3), spec(2)).tokens
    return out


@pytest.mark.parametrize("tp, pp, layers", [(1, 2, (1, 3)), (2, 1, (2,)), (1, 4, (2,))], ids=["pp2", "tp2", "pp4"])
def test_speculative_equals_full_depth_under_parallelism(tp, pp, layers):
    results = run_distributed(_worker, tp * pp, tp, pp, layers)
    single = engine(*configs("gpt", exits=EXITS))
    full = generate_tokens(single, MANY, greedy(7), EarlyExitParams()).tokens
    for rank, got in enumerate(results):
        for layer in layers:
            assert got[(layer, 4)] == [full[:4], full[4:]], (rank, layer)
            assert got[(layer, 1)] == [full[1], full[6]], (rank, layer)
        assert got["sampled"] == results[0]["sampled"], rank  # every rank of the model agrees
        assert all(len(t) == SAMPLED.tokens_to_generate for t in got["sampled"])
    if "kv" in results[0]:
        _check_kv(results)
        _check_distribution(results[0]["tiny"])


def _check_kv(results):
    model = engine(*configs("llama", exits=(1,), use_exit_block=True)).model
    tokens = results[0]["kv"][0]
    assert tokens == generate_tokens(engine(*configs("llama", exits=(1,), use_exit_block=True)), PROMPTS[:1],
                                     greedy(8), EarlyExitParams()).tokens[0]
    reference = reference_cache(model, torch.tensor([PROMPTS[0] + tokens]))
    for rank in (0, 1):
        snapshots = results[rank]["kv"][1]
        assert len(snapshots) >= 2
        for snap in snapshots:
            assert_cache_prefix(snap, reference)


def _check_distribution(rows):
    """pp = 2, the draft exit on stage 0: the drafts' distributions travel to stage 1 for the verdict."""
    eng = tiny_vocab_engine()
    with torch.no_grad():
        out = eng.model(torch.tensor([TINY_PROMPT]))
    p = torch.softmax(out.output[0, -1, :12].float(), dim=-1)
    q = torch.softmax(out.exit_logits[1][0, -1, :12].float(), dim=-1)
    counts = torch.bincount(torch.tensor([t[0] for t in rows]), minlength=12).float()
    assert chi_square_pvalue(counts, p) > 1e-3 and chi_square_pvalue(counts, q) < 1e-6
