"""Confidence measures under pipeline parallelism (gloo, pp = 2, with tp = 1 and 2): margin, entropy and
CALM's cosine, with a constant or decaying threshold, by methods A and B, give the single-process tokens
and exit layers. Exits
1 and 2 sit on stage 0 and exit 3 on stage 1, so cosine at exit 3 compares with exit 2's hidden state,
which crosses the stage boundary in the carry (also when exit 2 itself may not fire)."""

import pytest

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.generation import generate_tokens

from megatron.testing.generation import CONFIDENCE_THRES as THRES
from megatron.testing.generation import CONFIDENCE_TOKENS as TOKENS
from megatron.testing.generation import PROMPTS, configs, engine, exits, greedy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

CASES = [  # (measure, method, threshold_decay, exit_layers)
    ("margin", "recompute", None, []),
    ("entropy", "pipeline", None, []),
    ("entropy", "recompute", 4.0, []),
    ("cosine", "recompute", None, []),
    ("cosine", "pipeline", 4.0, []),
    ("cosine", "pipeline", None, [3]),
]


def _runs(eng):
    out = []
    for measure, method, decay, layers in CASES:
        params = exits(THRES[measure], method, confidence=measure, threshold_decay=decay, exit_layers=layers)
        got = generate_tokens(eng, PROMPTS, greedy(TOKENS), params)
        out.append((got.tokens, got.exit_layers))
    return out


def _worker(rank, world, tp):
    state = ParallelState.build(ParallelDims(tp=tp, pp=2, dp=1))
    return _runs(engine(*configs("gpt", exits=(1, 2, 3)), state=state))


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2-pp2"])
def test_pp2_confidence_measures_equal_single_process(tp):
    results = run_distributed(_worker, 2 * tp, tp)
    want = _runs(engine(*configs("gpt", exits=(1, 2, 3))))
    assert any(layer == 3 for _, layers in want for row in layers for layer in row)  # stage 1's exit fires
    for rank, got in enumerate(results):
        for case, g, w in zip(CASES, got, want):
            assert g == w, (rank, case)
