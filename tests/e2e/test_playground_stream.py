"""The playground's own script (``static/playground.js``) streams: run under Node (its few DOM calls stubbed
by ``assets/playground_harness.js``) against the real server with a tiny random-weights model, a submitted
prompt shows its first token while the server is still generating (the generation waits until the page
has shown it), then one span per token coloured by its exit, the same exits as ``PUT /api`` gives, and
the stream's statistics. Skipped without ``node``; the headless-browser test covers the real page."""

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from megatron.testing.server import FLAGS, PROMPT, call, start_server
from megatron.text_generation import server
from megatron.text_generation.generation import generate

NODE = shutil.which("node")
pytestmark = [pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install -y nodejs)"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py: one intra-op thread
HARNESS = Path(__file__).parent / "assets" / "playground_harness.js"
SCRIPT = Path(server.__file__).parent / "static" / "playground.js"
TOKENS = 12


@pytest.fixture(scope="module")
def gated():
    """The server, its generation held after the first token until ``gate`` is set."""
    gate = {"event": threading.Event(), "held": []}

    def hold(engine):
        def held_generate(request, stream=None):
            def gated_stream(delta):
                stream(delta)
                if delta.tokens and not gate["event"].is_set():
                    gate["held"].append(gate["event"].wait(timeout=20))
            return generate(engine, request, stream=None if stream is None else gated_stream)
        return held_generate

    srv, _ = start_server(FLAGS, wrap=hold)
    yield srv, gate
    srv.stop()


def _page(srv, gate, mode, **fields):
    gate["event"].clear()
    gate["held"].clear()
    argv = [NODE, str(HARNESS), str(SCRIPT), srv.url, mode, str(TOKENS)] + [f"{k}={v}" for k, v in fields.items()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()
    if first == "FIRST":  # the page shows a token: let the generation go on
        gate["event"].set()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return first, json.loads((first + "\n" + out).strip().splitlines()[-1])


@pytest.mark.parametrize("mode, fields", [("early_exit", {"threshold": 0.5}), ("speculative", {"spec-tokens": 3})])
def test_page_shows_tokens_as_they_arrive(gated, mode, fields):
    srv, gate = gated
    body = {"prompts": [PROMPT], "tokens_to_generate": TOKENS, "decoding": mode}
    body.update({"early_exit_thres": fields["threshold"]} if mode == "early_exit" else
                {"num_speculative_tokens": fields["spec-tokens"]})
    gate["event"].set()  # the PUT /api reference does not wait
    want = json.loads(call(srv, "PUT", "/api", body)[2])["exit_layers"][0]
    first, page = _page(srv, gate, mode, **fields)
    assert first == "FIRST" and gate["held"] == [True]  # shown while the server was still generating
    assert page["status"] == "done" and page["error"] == ""
    assert [s["exit"] for s in page["spans"]] == want and len(want) == TOKENS
    assert 4 in want and len(set(want)) >= 2
    colours = {}
    for span in page["spans"]:
        colours.setdefault(span["exit"], set()).add(span["colour"])
    assert colours[4] == {None} and all(len(c) == 1 and None not in c for e, c in colours.items() if e != 4)
    stats = {s["id"]: s["text"] for s in page["stats"]}
    assert f"{TOKENS} tokens" in stats["speed"] and "tokens/s" in stats["speed"] and "share of tokens" in stats["share"]
    assert ("acceptance" in stats) == (mode == "speculative")


def test_page_shows_the_servers_error(gated):
    srv, gate = gated
    gate["event"].set()
    first, page = _page(srv, gate, "full", tokens=70)
    assert "64 positions" in page["error"] and "field tokens_to_generate" in page["error"] and page["spans"] == []
