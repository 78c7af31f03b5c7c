"""Checkpoints in EE-LLM's nested layout (``state_dict_for_save_checkpoint``, with its extra embedding
copies) open with ``--load`` in training (resume and ``--finetune``), the server and the evaluation tool,
and give exactly what the same weights in our layout give. pp = 4, tied embeddings, untied exits on
stages 0 and 2 (stage 2 then holds EE-LLM's unused ``word_embeddings_for_head``)."""

import json
import os
import shutil
import urllib.request

import pytest

from megatron.checkpoint import checkpoint_file
from megatron.checkpoint import read_file
from megatron.checkpoint.model_loader import load_inference_model
from megatron.evaluation.__main__ import main as evaluate
from megatron.testing.distributed import run_distributed
from megatron.testing.ee_llm_checkpoint import rewrite_as_ee_llm
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate
from megatron.text_generation.server import InferenceServer, worker_loop
from megatron.text_generation.server_launch import make_service, model_info, server_args
from megatron.testing.training import run_main, tiny_argv
from tools.checkpoint.megatron_io import configs_from_checkpoint_args

PP = 4
SWITCHES = ["--untie-exit-output-weights", "--use-exit-norm"]
MODEL = dict(pipeline_model_parallel_size=PP, exit_layer_nums="1 3", hidden_dropout=0, attention_dropout=0)
MODEL_FLAGS = ["--load-iteration", "2", "--use-checkpoint-args", "--tokenizer-type", "NullTokenizer", "--vocab-size",
               "60", "--device", "cpu"]
BODIES = [{"prompts": ["3 5 7"], "tokens_to_generate": 4},
          {"prompts": ["9 2"], "tokens_to_generate": 4, "use_early_exit": True, "early_exit_thres": 0}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(ours, EE-LLM's): the same weights after 2 of 3 iterations (so a resume has one step left), in our
    layout and rewritten in EE-LLM's."""
    root = tmp_path_factory.mktemp("ee_llm")
    ours, theirs = str(root / "ours"), str(root / "ee_llm")
    run_main(PP, tiny_argv(*SWITCHES, save=ours, train_iters=3, save_interval=2, **MODEL))
    shutil.copytree(ours, theirs)
    cfg, ee = configs_from_checkpoint_args(read_file(checkpoint_file(ours, 2, 0, 0, PP))["args"])
    cfg.padded_vocab_size = cfg.padded_vocab(1)  # a mock-data run stores no padded size
    rewrite_as_ee_llm(theirs, 2, cfg, ee, 1, PP)
    stage2 = read_file(checkpoint_file(theirs, 2, 0, 2, PP))["model"]
    assert set(stage2) == {"language_model", "word_embeddings_for_head"}
    assert "word_embeddings_for_head.weight" not in read_file(checkpoint_file(ours, 2, 0, 2, PP))["model"]
    return ours, theirs


def _steps(result):
    return [(h["iteration"], h["losses"], h["grad_norm"]) for h in result.history]


@pytest.mark.parametrize("how", ["resume", "finetune"])
def test_training_loads_the_ee_llm_layout(checkpoints, how):
    flags = [*SWITCHES, "--finetune"] if how == "finetune" else SWITCHES
    runs = [_steps(run_main(PP, tiny_argv(*flags, load=ckpt, load_iteration=2, train_iters=3 if how == "resume" else 1,
                                          **MODEL))[0])
            for ckpt in checkpoints]
    assert runs[0] == runs[1]
    assert [s[0] for s in runs[0]] == ([3] if how == "resume" else [1])
    fresh = _steps(run_main(PP, tiny_argv(*SWITCHES, train_iters=1, **MODEL))[0])
    assert fresh[0][1] != runs[0][0][1]  # the weights did come from the checkpoint


def _put(url, body):
    req = urllib.request.Request(url + "/api", data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _serve(rank, world, load):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    args = server_args(["--load", load, *MODEL_FLAGS])
    run, state, tokenizer, chunks = load_inference_model(args)
    engine = InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)
    gen = lambda request: generate(engine, request)  # noqa: E731
    if rank != 0:
        return worker_loop(gen, state)
    srv = InferenceServer(make_service(gen, state, model_info(args, run, tokenizer)), port=0).start()
    try:
        return [_put(srv.url, body) for body in BODIES]
    finally:
        srv.stop()


def test_the_server_serves_the_ee_llm_layout(checkpoints):
    ours, theirs = (run_distributed(_serve, PP, ckpt, timeout=120)[0] for ckpt in checkpoints)
    assert [a["text"] for a in theirs] == [a["text"] for a in ours]
    assert [a["exit_layers"] for a in theirs] == [a["exit_layers"] for a in ours] == [[[4] * 4], [[1] * 4]]


def _evaluate(rank, world, load, task, output):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    return evaluate(["--task", task, "--max-gen-toks", "3", "--output", output, "--", "--load", load, *MODEL_FLAGS])


def test_the_evaluation_tool_reads_the_ee_llm_layout(checkpoints, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": c, "answer": "1"}) + "\n" for c in ("1 2 3", "4 4", "7")))
    results = []
    for n, ckpt in enumerate(checkpoints):
        output = tmp_path / f"out{n}.json"
        assert run_distributed(_evaluate, PP, ckpt, str(task), str(output), timeout=120) == [0] * PP
        results.append(json.loads(output.read_text())["results"][0]["outputs"])
    assert results[0] == results[1] and len(results[0]) == 3
