"""A failure during a generation step, on any pipeline stage, leaves every rank ready for the next
request (gloo): at pp = 2 a step made to raise once on stage 1, then once on stage 0, in the middle of a
generation of each strategy (token by token by methods A and B, speculative greedy and sampled with the
draft exit on either stage, beam search, scoring) makes that request fail on every rank, and the next
request returns exactly what the same request returned before the failure; at pp = 3 the same with the
middle and the last stage failing."""

import pytest

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, SamplingParams
from megatron.text_generation.runner import StageRunner

from megatron.testing.generation import PROMPTS, configs, engine, exits, greedy
from megatron.testing.generation import spec

REQUESTS = {  # name -> (prompts, sampling, early-exit params, the step (on the failing stage) that raises)
    "full": (PROMPTS, greedy(5), EarlyExitParams(), 2),
    "early_exit_A": (PROMPTS, greedy(5), exits(0.3, "recompute"), 2),
    "early_exit_B": (PROMPTS, greedy(5), exits(0.3, "pipeline"), 2),
    "speculative_exit_on_stage_0": (PROMPTS, greedy(6), spec(2, 1), 2),
    "speculative_exit_on_stage_1": (PROMPTS, greedy(6), spec(2, 3), 3),
    "speculative_sampled": (PROMPTS, SamplingParams(tokens_to_generate=6, top_k=8, random_seed=3), spec(2, 1), 2),
    "beam": (PROMPTS[:1], SamplingParams(tokens_to_generate=4, beam_width=2), EarlyExitParams(), 2),
    "score": (PROMPTS, SamplingParams(tokens_to_generate=0), EarlyExitParams(), 1),
}


class _Injector:
    """Makes the ``at``-th step run on ``stage`` raise, once."""

    def __init__(self):
        self.stage, self.at, self.calls = None, 0, 0

    def arm(self, stage: int, at: int) -> None:
        self.stage, self.at, self.calls = stage, at, 0

    def wrap(self, run):
        def failing(runner, header, payload, ids=None, hidden=None):
            if runner.eng.stage == self.stage:
                self.calls += 1
                if self.calls == self.at:
                    self.stage = None
                    raise RuntimeError("injected failure")
            return run(runner, header, payload, ids=ids, hidden=hidden)
        return failing


def _outcome(eng, request):
    prompts, sampling, ee, _ = request
    try:
        out = generate_tokens(eng, prompts, sampling, ee)
    except Exception as e:  # noqa: BLE001 -- the outcome is what the test compares
        return "raised", type(e).__name__
    return "ok", (out.tokens, out.exit_layers, out.prompt_logprobs)


def _worker(rank, world, names, stages):
    state = ParallelState.build(ParallelDims(pp=world))
    eng = engine(*configs("gpt", exits=(1, 2, 3), num_layers=2 * world), state=state)
    injector = _Injector()
    StageRunner._run = injector.wrap(StageRunner._run)  # a forked worker: the patch dies with it
    out = {}
    for name in names:
        request = REQUESTS[name]
        before = _outcome(eng, request)
        for stage in stages:
            injector.arm(stage, request[3])
            failed = _outcome(eng, request)
            again = _outcome(eng, request)
            out[(name, stage)] = (before, failed, again, injector.stage is None)
    return state.pp_rank, out


# pp = 3: a middle stage fails while the draft exit's stage (0) sends the drafts' distributions straight
# to the last stage, which must still take them
@pytest.mark.parametrize("pp, names, stages", [
    (2, list(REQUESTS), (1, 0)),
    (3, ["speculative_sampled", "early_exit_B", "early_exit_A"], (1, 2)),
], ids=["pp2", "pp3"])
def test_a_failed_step_on_any_stage_leaves_every_rank_serving(pp, names, stages):
    results = dict(run_distributed(_worker, pp, names, stages, timeout=300))  # stage -> outcomes
    for (name, stage), (before, failed, again, _) in results[0].items():
        assert results[stage][(name, stage)][3], (name, stage)  # the injected step ran there and raised
        for rank_stage in range(pp):
            b, f, a, _ = results[rank_stage][(name, stage)]
            assert b[0] == "ok" and b == before, (name, stage, rank_stage)
            assert f[0] == "raised", (name, stage, rank_stage, f)  # the failed request raised on every rank
            assert a == before, (name, stage, rank_stage)  # and the next request gives the same answer
        # stage 0 raises its own error, or the stage failure a later stage reported; the others GenerationFailed
        assert failed[1] == ("RuntimeError" if stage == 0 else "StageFailure"), (name, stage, failed)
        assert all(results[r][(name, stage)][1][1] == "GenerationFailed" for r in range(1, pp)), (name, stage)
