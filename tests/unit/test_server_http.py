"""Real HTTP against a running InferenceServer whose generate function is a fake (no model): PUT /api,
OpenAI completions (streaming too), health, 400/404/500 answers, and concurrent requests serialised."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron.text_generation.request import GenerationResult, parse_api_request
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo, ServiceClosed


class FakeGenerate:
    """Token k of prompt p is " p<k>"; tokens alternate between exit layer 2 and full depth 4. Asserts
    that it is never entered twice at once (the server's lock must serialise requests)."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.active, self.calls = delay, 0, 0
        self.guard = threading.Lock()

    def __call__(self, request):
        with self.guard:
            self.active += 1
            assert self.active == 1, "generate re-entered: requests were not serialised"
        try:
            time.sleep(self.delay)
            if request.prompts[0] == "boom":
                raise RuntimeError("model exploded")
            return self._result(request)
        finally:
            with self.guard:
                self.active -= 1
                self.calls += 1

    @staticmethod
    def _result(request):
        s = request.sampling
        texts, segments, exits, tokens = [], [], [], []
        for p in request.prompts:
            pieces = [f" {p}{k}" for k in range(s.tokens_to_generate)]
            for stop in s.stop_sequences:
                if stop in pieces:
                    pieces = pieces[:pieces.index(stop)]
            exits.append([2 if k % 2 == 0 else 4 for k in range(len(pieces))])
            tokens.append([7] * (3 + len(pieces)))  # a 3-token prompt, then the generation
            if s.echo_prompts:
                pieces = [p] + pieces
            segments.append(pieces)
            texts.append("".join(pieces))
        logprobs = [[-0.5] * len(seg) for seg in segments] if s.logprobs else None
        return GenerationResult(texts, segments, tokens, logprobs, exits, sum(map(len, exits)), 0.01)


@pytest.fixture(scope="module")
def fake():
    return FakeGenerate(delay=0.02)


@pytest.fixture(scope="module")
def server(fake):
    info = ModelInfo(name="tiny-ee", num_layers=4, exit_layers=[2], tokenize=str.split)
    srv = InferenceServer(GenerationService(fake, info), port=0).start()
    yield srv
    srv.stop()


def call(server, method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_put_api_ee_llm_shape(server):
    status, body = call(server, "PUT", "/api", {"prompts": ["a", "b"], "tokens_to_generate": 4, "logprobs": True,
                                                "use_early_exit": True, "early_exit_thres": 1, "exit_layers": [2]})
    assert status == 200
    out = json.loads(body)
    assert out["text"] == [" a0 a1 a2 a3", " b0 b1 b2 b3"]
    assert out["segments"][1] == [" b0", " b1", " b2", " b3"] and out["logprobs"][0] == [-0.5] * 4
    assert out["exit_layers"] == [[2, 4, 2, 4]] * 2 and out["exit_share"] == {"2": 0.5, "4": 0.5}
    assert out["requst_time"] > 0 and out["tokens_per_s"] == pytest.approx(800.0)


def test_stop_sequences_and_echo(server):
    status, body = call(server, "PUT", "/api", {"prompts": "q", "tokens_to_generate": 5, "stop_sequences": [" q2"],
                                                "echo_prompts": True})
    assert status == 200 and json.loads(body)["text"] == ["q q0 q1"]


@pytest.mark.parametrize("body, field", [
    ({"prompts": "a", "use_early_exit": "false"}, "use_early_exit"),
    ({"prompts": "a", "top_k": -1}, "top_k"),
    ({"prompts": "a", "exit_layers": [3]}, "exit_layers"),  # valid syntax, but the model has no exit at 3
    ({"max_len": 3, "prompts": "a"}, "max_len"),
    ({"prompts": "a", "top_p_bound": 0.1}, "top_p_bound"),
])
def test_invalid_fields_get_400_with_reason(server, body, field):
    status, text = call(server, "PUT", "/api", body)
    out = json.loads(text)
    assert status == 400 and out["field"] == field and out["error"]


def test_bad_json_and_unknown_paths(server):
    status, text = call(server, "PUT", "/api", raw=b"{not json")
    assert status == 400 and json.loads(text)["field"] == "body"
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "POST", "/api", {"prompts": "a"})[0] == 405


def test_internal_error_is_500_and_server_stays_up(server):
    status, text = call(server, "PUT", "/api", {"prompts": "boom"})
    assert status == 500 and "model exploded" in json.loads(text)["error"]
    assert call(server, "PUT", "/api", {"prompts": "ok", "tokens_to_generate": 1})[0] == 200


def test_health(server):
    status, text = call(server, "GET", "/health")
    out = json.loads(text)
    assert status == 200 and out["status"] == "ok" and out["model"] == "tiny-ee" and out["exit_layers"] == [2]


def test_concurrent_requests_serialised_and_answered(server, fake):
    def one(i):
        return call(server, "PUT", "/api", {"prompts": [f"r{i}"], "tokens_to_generate": 2})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(16)))
    for i, (status, text) in enumerate(answers):
        assert status == 200 and json.loads(text)["text"] == [f" r{i}0 r{i}1"]
    assert fake.active == 0


def test_openai_completions(server):
    status, text = call(server, "POST", "/v1/completions", {"model": "x", "prompt": ["a", "b"], "max_tokens": 3,
                                                            "logprobs": 1, "stop": [" b1"]})
    out = json.loads(text)
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "tiny-ee"
    a, b = out["choices"]
    assert (a["text"], a["index"], a["finish_reason"]) == (" a0 a1 a2", 0, "length")
    assert (b["text"], b["index"], b["finish_reason"]) == (" b0", 1, "stop")
    assert a["logprobs"]["tokens"] == [" a0", " a1", " a2"] and a["logprobs"]["text_offset"] == [0, 3, 6]
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert out["exit_share"] == {"2": 0.75, "4": 0.25}


def test_openai_streaming(server):
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "s", "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " s0 s1 s2"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1


def test_stopped_service_answers_503():
    srv = InferenceServer(GenerationService(FakeGenerate()), port=0).start()
    url = srv.url
    srv.service.close()
    try:
        req = urllib.request.Request(url + "/api", method="PUT", data=json.dumps({"prompts": "a"}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 503
    finally:
        srv.stop()


def test_close_gives_up_on_a_hung_request():
    release, entered = threading.Event(), threading.Event()

    def hang(request):
        entered.set()
        release.wait(10)
        return FakeGenerate._result(request)

    service = GenerationService(hang)
    worker = threading.Thread(target=service.run, args=(parse_api_request({"prompts": "a"}),))
    worker.start()
    entered.wait(10)
    start = time.perf_counter()
    service.close(timeout=0.1)
    assert time.perf_counter() - start < 5
    release.set()
    worker.join()
    with pytest.raises(ServiceClosed):
        service.run(parse_api_request({"prompts": "a"}))
