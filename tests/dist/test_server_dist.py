"""The server over two ranks (pp = 2 or tp = 2, gloo): rank 0 serves HTTP on a free loopback port and broadcasts
each request; rank 1 follows in worker_loop until the shutdown message. Answers (concurrent ones too)
equal a single-process model's; a request the model rejects gets 400 without reaching rank 1."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate
from megatron.text_generation.request import parse_api_request
from megatron.text_generation.server import InferenceServer, worker_loop
from megatron.checkpoint.model_loader import load_inference_model
from megatron.text_generation.server_launch import make_service, model_info, server_args
from megatron.testing.distributed import run_distributed

FLAGS = ("--random-weights --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --exit-layer-nums 1 3 --tokenizer-type NullTokenizer --vocab-size 50 "
         "--device cpu").split()
# Odd requests exit at the first exit (threshold 0), even ones never: the worker must apply each request.
BODIES = [{"prompts": [f"{i + 3} 5 {7 * i + 2}"], "tokens_to_generate": 4, "use_early_exit": i % 2 == 1,
           "early_exit_thres": 0} for i in range(4)]


def _engine(flags):
    args = server_args(flags)
    run, state, tokenizer, chunks = load_inference_model(args)
    return args, run, state, InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)


def _put(url, body):
    req = urllib.request.Request(url + "/api", data=json.dumps(body).encode(), method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve(rank, world, parallel_flags):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    args, run, state, engine = _engine(FLAGS + parallel_flags)
    gen = lambda request: generate(engine, request)  # noqa: E731
    if rank != 0:
        return worker_loop(gen, state)
    srv = InferenceServer(make_service(gen, state, model_info(args, run, engine.tokenizer)), port=0).start()
    try:
        bad = _put(srv.url, {"prompts": ["1"], "exit_layers": [2]})
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda b: _put(srv.url, b), BODIES))
    finally:
        srv.stop()
    return bad, answers


@pytest.mark.parametrize("parallel_flags", [["--pipeline-model-parallel-size", "2"],
                                            ["--tensor-model-parallel-size", "2"]], ids=["pp2", "tp2"])
def test_two_rank_server_matches_single_process(parallel_flags):
    (bad, answers), served = run_distributed(_serve, 2, parallel_flags, timeout=120)
    assert bad[0] == 400 and bad[1]["field"] == "exit_layers"
    assert served == len(BODIES)  # the rejected request never reached rank 1
    *_, engine = _engine(FLAGS)
    for body, (status, out) in zip(BODIES, answers):
        expected = generate(engine, parse_api_request(body))
        assert status == 200 and out["text"] == expected.texts and out["exit_layers"] == expected.exit_layers
        assert out["exit_layers"] == [[1 if body["use_early_exit"] else 4] * 4]
    assert len({tuple(out["text"]) for _, out in answers}) > 1
