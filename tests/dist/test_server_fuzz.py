"""A seeded fuzz of a real 2-rank (pp = 2, and tp = 2) server over raw sockets (``megatron.testing.server_fuzz``):
a few hundred malformed requests (wrong types, extreme numbers, unknown fields, broken JSON, deep
nesting, bad headers, wrong routes) get only statuses in {200, 400, 404, 405, 411, 413}, none hangs, and
after every batch a valid request still returns the text it returned first."""

import os

import pytest

from megatron.testing.distributed import run_distributed
from megatron.testing.server_fuzz import ALLOWED, base_bodies, fuzz, generate_cases
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate
from megatron.text_generation.request import ServerLimits
from megatron.text_generation.server import InferenceServer, worker_loop
from megatron.checkpoint.model_loader import load_inference_model
from megatron.text_generation.server_launch import make_service, model_info, server_args

FLAGS = ("--random-weights --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --exit-layer-nums 1 3 --tokenizer-type NullTokenizer --vocab-size 50 "
         "--device cpu").split()
# A small body limit, so that the fuzz's long texts and deep nestings also meet the 413 path.
LIMITS = ServerLimits(max_body_bytes=64 << 10, read_timeout_s=10.0, sync_timeout_s=20.0)
CASES, SEED = 300, 15
REFERENCE = {"prompts": ["1 2 3 4"], "tokens_to_generate": 5}


def _fuzz(rank, world, parallel_flags):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    args = server_args(FLAGS + parallel_flags)
    run, state, tokenizer, chunks = load_inference_model(args)
    engine = InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)
    gen = lambda request: generate(engine, request)  # noqa: E731
    if rank != 0:
        return worker_loop(gen, state, LIMITS.sync_timeout_s)
    srv = InferenceServer(make_service(gen, state, model_info(args, run, tokenizer), LIMITS), port=0).start()
    try:
        api, completions = base_bodies([str(i) for i in range(1, 10)])
        report = fuzz(srv.url, generate_cases(SEED, CASES, api, completions), REFERENCE, batch=50, timeout=30.0)
    finally:
        srv.stop(close_timeout=10.0)
    return report


@pytest.mark.parametrize("parallel_flags", [["--pipeline-model-parallel-size", "2"],
                                            ["--tensor-model-parallel-size", "2"]], ids=["pp2", "tp2"])
def test_fuzzed_requests_never_wedge_a_two_rank_server(parallel_flags):
    report, _ = run_distributed(_fuzz, 2, parallel_flags, timeout=240)
    assert report.cases == CASES, f"stopped early: {report.bad[-1:]}"
    assert not report.bad, f"statuses outside {sorted(ALLOWED)}: {report.bad[:5]}"
    assert not report.drift, f"the reference answer changed: {report.drift}"
    by_status = report.by_status()
    assert set(by_status) == ALLOWED, by_status  # every class of answer was reached, valid generations too
    kinds = {kind for kind, _ in report.statuses}
    assert kinds >= {"type", "number", "unknown_field", "string", "combo", "json", "nesting", "header", "route"}
