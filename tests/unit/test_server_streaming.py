"""Streaming as tokens are decided (``streaming.py`` and the server's ``stream: true`` path), over real HTTP
with a tiny random-weights model: the client holds the first token while the server is provably still
generating (the generation waits for the client to have read it, so a server that sent its chunks only
after generating would never deliver it), for full depth, early exit and self-speculative decoding; the
streamed texts and exit layers equal the non-streamed answer; text that may start a stop sequence is held
back; a failure after the first event ends the stream with an error event."""

import functools
import json
import threading
import urllib.request

import pytest

from megatron.text_generation.generation import generate
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo
from megatron.text_generation.streaming import Delta, TextStream

from megatron.testing.generation import configs, engine


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

PROMPT = "5 17 33 2 60 8"
MODES = {"full": {}, "early_exit": {"decoding": "early_exit", "early_exit_thres": 0.3},
         "speculative": {"decoding": "speculative", "num_speculative_tokens": 3}}


class _Gate:
    """Generation blocks after handing its first token to the stream until the client says it read it."""

    def __init__(self):
        self.read = threading.Event()
        self.held = None  # whether the client had the first token while the generation was waiting

    def generate(self, eng, request, stream=None):
        def gated(delta: Delta) -> None:
            stream(delta)
            if self.held is None and delta.tokens:
                self.held = self.read.wait(timeout=20)

        return generate(eng, request, stream=None if stream is None else gated)


@pytest.fixture(scope="module")
def eng():
    return engine(*configs("gpt", exits=(1, 2, 3)))


def _server(eng, gate):
    tok = eng.tokenizer
    info = ModelInfo(name="tiny", num_layers=4, exit_layers=[1, 2, 3], tokenize=tok.tokenize, detokenize=tok.detokenize)
    return InferenceServer(GenerationService(functools.partial(gate.generate, eng), info), port=0).start()


def _post(srv, body):
    req = urllib.request.Request(srv.url + "/v1/completions", data=json.dumps(body).encode(), method="POST")
    return urllib.request.urlopen(req, timeout=60)


def _events(resp, on_first=None):
    events = []
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        events.append(json.loads(line[len("data: "):]))
        if len(events) == 1 and on_first is not None:
            on_first()
    return events


@pytest.mark.parametrize("mode", list(MODES))
def test_first_token_arrives_while_generating(eng, mode):
    gate = _Gate()
    srv = _server(eng, gate)
    try:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **MODES[mode]}
        with _post(srv, {**body, "stream": True}) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            events = _events(resp, on_first=gate.read.set)
        with _post(srv, body) as resp:
            whole = json.loads(resp.read())
    finally:
        srv.stop()
    assert gate.held is True  # the client read a token before the generation went on
    chunks, summary = [e for e in events if e["choices"]], events[-1]
    assert summary["choices"] == [] and summary["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["text"] for c in chunks)
    layers = [layer for c in chunks for layer in c["choices"][0]["exit_layers"]]
    assert text == whole["choices"][0]["text"] and layers == whole["choices"][0]["exit_layers"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert len(chunks) >= 3  # the tokens came in several chunks, not at the end
    if mode == "early_exit":
        assert {1, 2, 3} & set(layers) and 4 in layers
    if mode == "speculative":
        assert summary["speculative"]["rounds"] >= 2


def test_streamed_logprobs_and_pieces_equal_the_whole_answer(eng):
    gate = _Gate()
    gate.read.set()
    srv = _server(eng, gate)
    try:
        body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0, "decoding": "speculative"}
        with _post(srv, {**body, "stream": True}) as resp:
            chunks = [e for e in _events(resp) if e["choices"]]
        with _post(srv, body) as resp:
            whole = json.loads(resp.read())["choices"][0]["logprobs"]
    finally:
        srv.stop()
    streamed = {key: [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"][key]]
                for key in ("tokens", "token_logprobs", "text_offset")}
    assert streamed["tokens"] == whole["tokens"] and streamed["text_offset"] == whole["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-6)


def test_text_that_may_start_a_stop_sequence_is_held_back():
    deltas = []
    words = {1: "ab", 2: "c", 3: "d", 4: "x", 9: ""}
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), [[4]], echo=False, stop_ids={9},
                        stops=["cd!"], on_delta=deltas.append)
    for token in (1, 2, 3, 4, 9):
        stream.emit(0, [token], [2], [-1.0])
    # "c" and "cd" could begin "cd!": held until "x" shows they do not; the stop token adds nothing
    assert [d.text for d in deltas] == ["ab", "", "", "cdx", ""]
    assert [d.pieces for d in deltas] == [["ab"], ["c"], ["d"], ["x"], [""]]
    assert [d.text for d in stream.close(["abcdx"])] == [""]
    cut = TextStream(lambda ids: "".join(words[i] for i in ids), [[4]], echo=False, stop_ids=set(), stops=["cd"],
                     on_delta=deltas.append)
    deltas.clear()
    for token in (1, 2, 3):
        cut.emit(0, [token], [4], [-1.0])
    assert "".join(d.text for d in deltas) == "ab"  # the stop sequence itself is never sent
    assert [d.text for d in cut.close(["ab"])] == [""]


def test_a_failure_after_the_first_event_ends_the_stream_with_an_error(eng):
    def failing(request, stream=None):
        def explode(delta):
            stream(delta)
            raise RuntimeError("model exploded mid-stream")
        return generate(eng, request, stream=explode)

    tok = eng.tokenizer
    info = ModelInfo(num_layers=4, exit_layers=[1, 2, 3], tokenize=tok.tokenize, detokenize=tok.detokenize)
    srv = InferenceServer(GenerationService(failing, info), port=0).start()
    try:
        with _post(srv, {"prompt": PROMPT, "max_tokens": 4, "stream": True}) as resp:
            events = _events(resp)
    finally:
        srv.stop()
    assert events[0]["choices"][0]["exit_layers"] and "model exploded" in events[-1]["error"]
