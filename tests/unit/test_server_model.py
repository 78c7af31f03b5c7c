"""End to end in one process: a tiny random-weights model behind the real server (tp = pp = 1). The
HTTP answers equal direct generate() calls; early exit at threshold 0 leaves every token at the exit."""

import json
import urllib.error
import urllib.request

import pytest

from megatron.testing.server import start_server
from megatron.text_generation.generation import generate
from megatron.text_generation.request import parse_api_request

FLAGS = ("--random-weights --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --exit-layer-nums 2 --tokenizer-type NullTokenizer --vocab-size 50 "
         "--device cpu").split()


@pytest.fixture(scope="module")
def served():
    srv, engine = start_server(FLAGS, wrap=lambda engine: lambda r: generate(engine, r))  # not streaming
    yield srv, engine
    srv.stop()


def _send(srv, method, path, body):
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


def test_api_matches_direct_generate(served):
    srv, engine = served
    body = {"prompts": ["3 14 15 9", "2 6"], "tokens_to_generate": 5, "logprobs": True}
    out = json.loads(_send(srv, "PUT", "/api", body))
    direct = generate(engine, parse_api_request(body))
    assert out["text"] == direct.texts and out["segments"] == direct.segments
    assert out["exit_layers"] == direct.exit_layers and out["exit_share"] == {"4": 1.0}  # no exit by default
    assert len(out["logprobs"][0]) >= 5 and out["tokens_per_s"] > 0


def test_threshold_zero_exits_at_the_exit(served):
    srv, _ = served
    out = json.loads(_send(srv, "PUT", "/api", {"prompts": ["7 7 7"], "tokens_to_generate": 4,
                                                "use_early_exit": True, "early_exit_thres": 0}))
    assert out["exit_layers"] == [[2, 2, 2, 2]] and out["exit_share"] == {"2": 1.0}


def test_openai_stream_equals_whole_completion(served):
    srv, _ = served
    body = {"prompt": "1 2 3", "max_tokens": 4, "temperature": 0}
    whole = json.loads(_send(srv, "POST", "/v1/completions", body))
    events = _send(srv, "POST", "/v1/completions", {**body, "stream": True}).split("\n\n")
    chunks = [json.loads(e[len("data: "):]) for e in events if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    choice = whole["choices"][0]
    assert whole["usage"]["prompt_tokens"] == 3 and whole["usage"]["completion_tokens"] == len(choice["exit_layers"])
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    if choice["finish_reason"] == "length":  # else a stop token ended it: no chunk for that token
        assert len(chunks) == len(choice["exit_layers"])


def test_too_long_request_is_400_before_generating(served):
    srv, _ = served
    req = urllib.request.Request(srv.url + "/api", method="PUT",
                                 data=json.dumps({"prompts": "1 2 3", "tokens_to_generate": 62}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    body = json.loads(err.value.read())
    assert err.value.code == 400 and body["field"] == "tokens_to_generate" and "at most 61" in body["error"]
    assert json.loads(_send(srv, "PUT", "/api", {"prompts": "1 2 3", "tokens_to_generate": 61}))["text"]
