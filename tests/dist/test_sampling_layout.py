"""Sampled output does not depend on the parallel layout (gloo): with a seed, plain sampling, early-exit
sampling by methods A and B, and self-speculative sampling give exactly the single-process tokens at
pp = 2 and tp = 2, because every random number is a function of (seed, sequence, position) whichever
stage draws it (``sampling.Draws``). Exits 1 and 2 sit on stage 0, exit 3 and the head on stage 1, so
tokens are drawn on both stages."""

import pytest

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, SamplingParams

from megatron.testing.generation import PROMPTS, configs, engine, exits, spec


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

SAMPLED = [SamplingParams(tokens_to_generate=6, top_k=10, random_seed=5),
           SamplingParams(tokens_to_generate=6, top_p=0.9, temperature=1.3, random_seed=11)]
MODES = {"plain": EarlyExitParams(), "early_exit_A": exits(0.3, "recompute"), "early_exit_B": exits(0.3, "pipeline"),
         "speculative": spec(2, 1)}


def _runs(eng):
    out = {}
    for name, ee in MODES.items():
        for i, sampling in enumerate(SAMPLED):
            got = generate_tokens(eng, PROMPTS, sampling, ee)
            out[(name, i)] = (got.tokens, got.exit_layers)
    return out


def _worker(rank, world, tp, pp):
    state = ParallelState.build(ParallelDims(tp=tp, pp=pp))
    return _runs(engine(*configs("gpt", exits=(1, 2, 3)), state=state))


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)], ids=["pp2", "tp2"])
def test_sampled_tokens_equal_the_single_process_ones(tp, pp):
    results = run_distributed(_worker, tp * pp, tp, pp)
    want = _runs(engine(*configs("gpt", exits=(1, 2, 3))))
    for i in range(len(SAMPLED)):
        # early exit samples some tokens at exits (stage 0), others at the head (stage 1); A and B agree
        assert want[("early_exit_A", i)] == want[("early_exit_B", i)]
        assert {layer for row in want[("early_exit_A", i)][1] for layer in row} > {4}
        assert want[("plain", i)][0] != want[("early_exit_A", i)][0]
    assert want[("plain", 0)][0] != want[("plain", 1)][0]
    for rank, got in enumerate(results):
        for key in want:
            assert got[key] == want[key], (rank, key)
