"""The lm-eval adapter under model parallelism (gloo): with tp = 2 every rank's log-likelihoods (final
head, an exit, a threshold) and generations equal the single-process ones; with pp = 2 generate_until
(through generate) does too, and scoring refuses with a message saying why."""

import pytest

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed

from megatron.testing.evaluation import make_lm

REQUESTS = [("1 2 3", " 4 5"), ("7 8", " 9"), ("", " 12 13"), ("3 3 3 3", " 3")]
GEN = [("1 2 3", {"max_gen_toks": 3}), ("7 8", {"max_gen_toks": 3}), ("30", {"max_gen_toks": 3})]
SETTINGS = [dict(), dict(exit_layer=1), dict(early_exit_thres=0.03), dict(early_exit_thres=0.03, confidence="entropy")]


def _evaluate(state=None, pp=1):
    lms = [make_lm(state, **kw) for kw in SETTINGS[:3]]
    out = {"generate": [lm.generate_until(GEN) for lm in lms], "exits": [lm.stats() for lm in lms]}
    if pp == 1:
        out["loglikelihood"] = [[lp for lp, _ in make_lm(state, **kw).loglikelihood(REQUESTS)] for kw in SETTINGS]
        out["rolling"] = make_lm(state, max_length=4).loglikelihood_rolling([("5 6 7 8 9 10 11",)])
    else:
        try:
            make_lm(state).loglikelihood(REQUESTS)
        except ValueError as e:
            out["error"] = str(e)
    return out


def _worker(rank, world, tp, pp):
    return _evaluate(ParallelState.build(ParallelDims(tp=tp, pp=pp)), pp)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_adapter_under_model_parallelism_equals_single_process(tp, pp):
    results = run_distributed(_worker, tp * pp, tp, pp)
    want = _evaluate()
    assert len({tuple(g) for g in want["generate"]}) == 3  # the settings do generate differently
    assert 1 < want["exits"][2]["mean_generated_exit_layer"] < 4  # some tokens exit, some do not
    for rank, got in enumerate(results):
        assert got["generate"] == want["generate"] and got["exits"] == want["exits"], rank
        if pp == 1:
            for a, b in zip(got["loglikelihood"] + [got["rolling"]], want["loglikelihood"] + [want["rolling"]]):
                assert a == pytest.approx(b, abs=1e-4), rank
        else:
            assert "every layer of the model in this process" in got["error"]
