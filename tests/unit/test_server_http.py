"""Real HTTP against a running InferenceServer whose generate function is a fake (no model): PUT /api,
OpenAI completions (streaming too), health, 400/404/500 answers, and concurrent requests serialised;
the limits (body size, read deadline, connections), bad headers over raw sockets, and a failed service
(ranks that cannot agree) reported by /health and ending the server with exit status 1."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron.testing.server_fuzz import Case, exchange
from megatron.text_generation.request import GenerationResult, ServerLimits, parse_api_request
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo, RanksDiverged, ServiceClosed


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


def _held():
    """A generate function that blocks until released, and the (release, entered) events driving it."""
    release, entered = threading.Event(), threading.Event()

    def hold(request):
        entered.set()
        release.wait(10)
        return FakeGenerate._result(request)

    return hold, release, entered


def test_close_gives_up_on_a_hung_request():
    hang, release, entered = _held()
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


# ------------------------------------------------------------------------------ limits, bad headers, health

def _raw(url, method, path, headers, body=b"", close_write=True, timeout=10.0):
    status, payload = exchange(url, Case("test", method, path, headers, body, close_write), timeout)
    return status, (json.loads(payload) if payload.startswith(b"{") else payload)


@pytest.mark.parametrize("headers, body, status, field", [
    ([("Content-Length", "-5")], b'{"prompts": "a"}', 400, "Content-Length"),
    ([("Content-Length", "abc")], b'{"prompts": "a"}', 400, "Content-Length"),
    ([("Content-Length", "+16")], b'{"prompts": "a"}', 400, "Content-Length"),
    ([("Content-Length", "16"), ("Content-Length", "17")], b'{"prompts": "a"}', 400, "Content-Length"),
    ([("Content-Length", "500")], b'{"prompts": "a"}', 400, "Content-Length"),  # the body ended early
    ([], b'{"prompts": "a"}', 411, "Content-Length"),
    ([("Transfer-Encoding", "chunked")], b'10\r\n{"prompts": "a"}\r\n0\r\n\r\n', 411, "Transfer-Encoding"),
    ([("Content-Length", str(10**30))], b"", 413, "Content-Length"),
    ([("Content-Length", "0" * 5000 + "3000")], b"[" * 3000, 413, "Content-Length"),
    ([("Content-Length", "3000")], b"[" * 3000, 413, "Content-Length"),  # over the fixture's 2,048 bytes
    ([("Content-Length", "2000")], b"[" * 1000 + b"]" * 1000, 400, "body"),  # RecursionError in json
])
def test_bad_headers_and_bodies_are_client_errors(limited, headers, body, status, field):
    got, out = _raw(limited.url, "PUT", "/api", headers, body)
    assert got == status and out["field"] == field and out["error"], out


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "OPTIONS", "BREW"])
def test_unsupported_methods_are_405(limited, method):
    assert _raw(limited.url, method, "/api", [("Content-Length", "0")])[0] == 405


def test_tokenizer_refusals_and_empty_prompts_are_400(limited):
    for prompt, reason in (("1 x 2", "tokenizer rejects"), ("   ", "no tokens"), ("1" * 1200, "tokenizer rejects")):
        status, text = call(limited, "PUT", "/api", {"prompts": [prompt], "tokens_to_generate": 1})
        out = json.loads(text)
        assert status == 400 and out["field"] == "prompts" and reason in out["error"], out
    status, text = call(limited, "PUT", "/api", raw=b'{"prompts": ["\\ud800"]}')
    assert status == 400 and json.loads(text)["field"] == "prompts"
    assert call(limited, "PUT", "/api", {"prompts": ["1 2"], "tokens_to_generate": 1})[0] == 200


def test_a_slow_client_is_cut_off_at_the_read_deadline(limited):
    """The fixture allows 0.5 s per request: a client that sends less than it announced gets 408; one
    that never finishes its headers, even sending a byte at a time, is disconnected (it would otherwise
    hold a thread as long as it likes)."""
    status, out = _raw(limited.url, "PUT", "/api", [("Content-Length", "100")], b'{"prompts"', close_write=False)
    assert status == 408 and out["field"] == "body"
    host, port = limited.httpd.server_address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"PUT /api HTTP/1.1\r\n")
        assert sock.recv(100) == b""  # closed by the server, long before the client's 10 s
    with socket.create_connection((host, port), timeout=10) as sock:
        with pytest.raises(OSError):  # reset or broken pipe once the server dropped the connection
            for _ in range(100):  # 10 s of a byte every 0.1 s
                sock.sendall(b"X")
                time.sleep(0.1)
                if sock.recv(100, socket.MSG_DONTWAIT) == b"":
                    raise ConnectionResetError("closed by the server")
    assert call(limited, "GET", "/health")[0] == 200


def test_connections_beyond_the_limit_get_503(limited):
    host, port = limited.httpd.server_address
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(3)]  # the fixture's limit is 3
    try:
        time.sleep(0.1)  # let the server accept them
        status, _ = _raw(limited.url, "GET", "/health", [])
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    for _ in range(50):  # the idle connections' threads end as their sockets close
        if call(limited, "GET", "/health")[0] == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server never freed the closed connections' slots")


@pytest.fixture
def limited():
    def strict(text):
        ids = [int(word) for word in text.split()]  # ValueError on non-integer words
        if any(i >= 50 for i in ids):
            raise ValueError(f"ids must be below 50, got {ids}")
        return ids

    info = ModelInfo(name="strict", num_layers=4, exit_layers=[2], tokenize=strict, vocab_size=50, max_positions=64)
    limits = ServerLimits(max_body_bytes=2048, max_connections=3, read_timeout_s=0.5)
    srv = InferenceServer(GenerationService(FakeGenerate(), info, limits=limits), port=0).start()
    yield srv
    srv.stop()


def test_ranks_that_cannot_agree_fail_the_server_for_good():
    """RanksDiverged from the generate function: 500 with the reason, /health 503 "failed", later requests
    503, and after the grace period the server stops with exit status 1 (a supervisor restarts it)."""
    def diverge(request):
        if request.prompts == ["diverge"]:
            raise RanksDiverged("rank 1 did not finish the request")
        return FakeGenerate._result(request)

    srv = InferenceServer(GenerationService(diverge), port=0, failure_grace_s=0.5)
    codes = []
    loop = threading.Thread(target=lambda: codes.append(srv.serve_forever(close_timeout=1.0)))
    loop.start()
    try:
        assert call(srv, "PUT", "/api", {"prompts": "ok", "tokens_to_generate": 1})[0] == 200
        status, text = call(srv, "PUT", "/api", {"prompts": "diverge"})
        assert status == 500 and "can no longer agree" in json.loads(text)["error"]
        status, text = call(srv, "GET", "/health")
        out = json.loads(text)
        assert status == 503 and out["status"] == "failed" and "rank 1" in out["reason"]
        assert out["requests_served"] == 1 and out["requests_failed"] == 1
        assert call(srv, "PUT", "/api", {"prompts": "ok", "tokens_to_generate": 1})[0] == 503
    finally:
        loop.join(timeout=30)
    assert codes == [1]


def test_health_reports_a_running_request():
    slow, release, entered = _held()
    srv = InferenceServer(GenerationService(slow), port=0).start()
    try:
        worker = threading.Thread(target=call, args=(srv, "PUT", "/api", {"prompts": "a", "tokens_to_generate": 1}))
        worker.start()
        entered.wait(10)
        out = json.loads(call(srv, "GET", "/health")[1])
        assert out["status"] == "ok" and out["busy_s"] is not None and out["limits"]["max_connections"] == 64
        release.set()
        worker.join()
        assert json.loads(call(srv, "GET", "/health")[1])["busy_s"] is None
    finally:
        release.set()
        srv.stop()
