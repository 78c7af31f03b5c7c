"""Generation under pipeline (and tensor, data) parallelism over gloo: every strategy on pp = 2 (tp = 1
and 2, dp = 1 and 2) and pp = 4 returns exactly the single-process tokens; methods A and B agree; with
threshold 0 and one exit the KV cache of every layer on both stages equals a full forward's after every
step."""

import pytest
import torch

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.generation import generate, generate_tokens
from megatron.text_generation.request import EarlyExitParams, GenerationRequest, SamplingParams

from megatron.testing.generation import (
    PROMPTS, assert_cache_prefix, cache_snapshot, configs, engine, exits, greedy, oracle_greedy, reference_cache,
)

THRES = 0.3


def _strategies(eng):
    out = {"full": generate_tokens(eng, PROMPTS, greedy(6), EarlyExitParams()).tokens}
    for method in ("recompute", "pipeline"):
        got = generate_tokens(eng, PROMPTS, greedy(6), exits(THRES, method))
        out[method] = (got.tokens, got.exit_layers)
    stop = out["pipeline"][0][1][1]  # method B stops at stop tokens too (EE-LLM's pipeline never stopped)
    out["stopped"] = generate_tokens(eng, PROMPTS, greedy(6, stop_token_ids=[stop]), exits(THRES, "pipeline")).tokens
    seeded = SamplingParams(tokens_to_generate=6, top_k=10, random_seed=5)
    out["sampled"] = [generate_tokens(eng, PROMPTS, seeded, exits(THRES)).tokens for _ in range(2)]
    scoring = SamplingParams(tokens_to_generate=0)
    out["score"] = generate(eng, GenerationRequest([" ".join(map(str, p)) for p in PROMPTS], scoring)).logprobs
    out["beam"] = generate_tokens(eng, PROMPTS[:1], SamplingParams(tokens_to_generate=5, beam_width=2),
                                  EarlyExitParams()).tokens
    return out


def _kv_runs(eng):
    """Threshold 0, one exit (layer 1, on stage 0): tokens and this stage's cache after every step.
    Method A runs with a window cap of 2, so stage 1 (skipped whenever the token exits on stage 0)
    gets its KV back-filled by the forced full-depth passes."""
    runs = {}
    for method, cap in (("recompute", 2), ("pipeline", None)):
        snapshots = []

        def observe(runner, header):
            snapshots.append(cache_snapshot(runner.kv, header.offset))

        got = generate_tokens(eng, PROMPTS[:1], greedy(6), exits(0.0, method, recompute_cap=cap), observer=observe)
        runs[method] = (got.tokens[0], got.exit_layers[0], snapshots)
    return runs


def _worker(rank, world, tp, pp, dp):
    state = ParallelState.build(ParallelDims(tp=tp, pp=pp, dp=dp))
    out = _strategies(engine(*configs("gpt", exits=EXITS), state=state))
    if tp == 1 and pp == 2 and dp == 1:
        out["kv"] = _kv_runs(engine(*configs("llama", exits=(1,), use_exit_block=True), state=state))
    return out


# exits on stages 0, 1 and 2 of 4: under method B stage 0 hears "continue" from stage 1 before stage 2's
# tokens, and stage 3 reports nothing when stage 2 completed the step
EXITS = (1, 2, 3)


@pytest.mark.parametrize("tp, pp, dp", [(1, 2, 1), (2, 2, 1), (1, 4, 1), (1, 2, 2)],
                         ids=["pp2", "tp2-pp2", "pp4", "pp2-dp2"])
def test_pipeline_generation_equals_single_process(tp, pp, dp):
    results = run_distributed(_worker, tp * pp * dp, tp, pp, dp)
    single = engine(*configs("gpt", exits=EXITS))
    want = _strategies(single)
    assert any(layer != 4 for row in want["recompute"][1] for layer in row)  # some tokens did exit
    for rank, got in enumerate(results):
        assert got["full"] == want["full"], rank
        assert got["recompute"] == want["recompute"], rank  # method A, stages skip after a full exit
        assert got["pipeline"] == want["recompute"], rank  # method B: identical tokens and exit layers
        assert got["sampled"][0] == got["sampled"][1] == results[0]["sampled"][0], rank  # every tp rank agrees
        assert got["beam"] == want["beam"], rank
        row = want["pipeline"][0][1]
        assert got["stopped"] == want["stopped"] and got["stopped"][1] == row[: row.index(row[1]) + 1], rank
        for lp, ref in zip(got["score"], want["score"]):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    if "kv" in results[0]:
        _check_kv(results)


def _check_kv(results):
    model = engine(*configs("llama", exits=(1,), use_exit_block=True)).model
    for method in ("recompute", "pipeline"):
        tokens, layers, _ = results[0]["kv"][method]
        assert tokens == oracle_greedy(model, PROMPTS[0], 6, exit_layer=1) and layers == [1] * 6
        reference = reference_cache(model, torch.tensor([PROMPTS[0] + tokens]))
        for rank in (0, 1):
            snapshots = results[rank]["kv"][method][2]
            for snap in snapshots:
                assert_cache_prefix(snap, reference)
        depth = max(next(iter(s.values()))[0].shape[1] for s in results[1]["kv"][method][2] if s)
        # (snapshots are taken before each step) B skips nothing: stage 1 cached every token fed; A caught
        # up at the capped windows
        assert depth == len(PROMPTS[0]) + 4 if method == "pipeline" else depth >= len(PROMPTS[0]) + 2
