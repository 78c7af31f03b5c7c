"""The real inference server over a tiny random-weights model, in this process, for HTTP tests.

:data:`FLAGS` is the server command line of that model (4 layers, exits at 1 and 3, NullTokenizer with
50 ids, CPU); :data:`PROMPT` a prompt it takes. :func:`load_engine` builds the model and engine of one
rank from server flags as ``serve`` does; :func:`start_server` serves it on a free loopback port (a
thread: no process) and returns the started ``InferenceServer`` (``.url``, ``.stop()``), with the engine;
:func:`call` sends one request and returns ``(status, content type, body text)``, error statuses included.
``tests/conftest.py``'s ``served`` fixture is :func:`start_server` on :data:`FLAGS` for a test module.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request

__all__ = ["FLAGS", "PROMPT", "load_engine", "start_server", "call"]

FLAGS = ("--random-weights --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --exit-layer-nums 1 3 --tokenizer-type NullTokenizer --vocab-size 50 "
         "--init-method-std 0.3 --device cpu").split()
PROMPT = "3 14 15 9 26"


def load_engine(flags: list[str]):
    """``(args, run, state, tokenizer, engine)`` of this rank for the server command line ``flags``."""
    from megatron.checkpoint.model_loader import load_inference_model
    from megatron.text_generation.engine import InferenceEngine
    from megatron.text_generation.server_launch import server_args

    args = server_args(flags)
    run, state, tokenizer, chunks = load_inference_model(args)
    return args, run, state, tokenizer, InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)


def start_server(flags: list[str] = FLAGS, wrap=None, limits=None):
    """``(server, engine)``: the started server for ``flags``, answering with ``generate(engine, request,
    stream)`` (streaming), or with ``wrap(engine)`` when given (a function of ``request``, streaming when it
    takes ``stream`` too); ``limits``: the server's ``ServerLimits``."""
    from megatron.text_generation.generation import generate
    from megatron.text_generation.server import InferenceServer
    from megatron.text_generation.server_launch import make_service, model_info

    args, run, state, tokenizer, engine = load_engine(flags)
    answer = wrap(engine) if wrap is not None else functools.partial(generate, engine)  # it streams
    extra = () if limits is None else (limits,)
    service = make_service(answer, state, model_info(args, run, tokenizer), *extra)
    return InferenceServer(service, port=0).start(), engine


def call(srv, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, str, str]:
    """One request to ``srv`` (JSON ``body`` when given): ``(status, Content-Type, body text)``."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()
