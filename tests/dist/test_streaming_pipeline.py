"""Streaming under pipeline parallelism (pp = 2, gloo): stage 0's stream callback receives every decoded
token as it is decided, whichever stage decided it (exits on both stages, the head on stage 1), for
full depth, early exit by methods A and B and self-speculative decoding: the deltas spell the result's
text and carry its exit layers."""

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.generation import generate
from megatron.text_generation.request import EarlyExitParams, GenerationRequest

from megatron.testing.generation import PROMPTS, configs, engine, exits, greedy
from megatron.testing.generation import spec

MODES = {"full": EarlyExitParams(), "A": exits(0.3, "recompute"), "B": exits(0.3, "pipeline"),
         "speculative": spec(2, 1)}


def _worker(rank, world):
    state = ParallelState.build(ParallelDims(pp=2))
    eng = engine(*configs("gpt", exits=(1, 2, 3)), state=state)
    out = {}
    for name, ee in MODES.items():
        deltas = []
        request = GenerationRequest([" ".join(map(str, p)) for p in PROMPTS], greedy(6), ee)
        result = generate(eng, request, stream=deltas.append if state.is_first_stage else None)
        streamed = {i: ("".join(d.text for d in deltas if d.index == i),
                        [layer for d in deltas if d.index == i for layer in d.exit_layers])
                    for i in range(len(PROMPTS))}
        out[name] = (streamed, result.texts, result.exit_layers, len([d for d in deltas if d.tokens]))
    return out


def test_stage_zero_streams_every_token_at_pp2():
    first, second = run_distributed(_worker, 2)
    for name, (streamed, texts, layers, chunks) in first.items():
        assert [streamed[i] for i in range(len(texts))] == list(zip(texts, layers)), name
        assert chunks >= len(texts) * 2, name  # several deltas per sequence, not one at the end
        assert second[name][1:3] == (texts, layers) and second[name][3] == 0  # no stream on stage 1
    assert {layer for row in first["B"][2] for layer in row} >= {1, 4}
