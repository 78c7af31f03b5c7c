"""tools/request_client.py and tools/text_generation_cli.py against a running server with a fake model:
the EE-LLM request shape, early-exit flags by value, printed answers, and errors reported."""

import json

import pytest

from megatron.text_generation.request import GenerationResult
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo
from tools import request_client, text_generation_cli


class Recorder:
    """A fake generate that remembers each request and answers ``<prompt>!`` from exit layer 2."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        n = len(request.prompts)
        texts = [p + "!" for p in request.prompts]
        return GenerationResult(texts, [[t] for t in texts], [[1, 2]] * n, [[-1.0]] * n, [[2]] * n, n, 0.5)


@pytest.fixture
def served():
    recorder = Recorder()
    srv = InferenceServer(GenerationService(recorder, ModelInfo(num_layers=4, exit_layers=[2])), port=0).start()
    yield srv.url + "/api", recorder
    srv.stop()


def test_request_client_sends_ee_llm_shape(served, tmp_path, capsys):
    url, recorder = served
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    code = request_client.main(["--url", url, "--prompt-file", str(prompts), "--tokens", "7", "--use-early-exit",
                                "--threshold", "0.8", "--exit-layers", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "one!" in out and "two!" in out and "layer 2: 100%" in out
    first = recorder.requests[0]
    assert first.prompts == ["one"] and first.sampling.tokens_to_generate == 7 and first.sampling.greedy
    assert first.sampling.logprobs and not first.sampling.echo_prompts
    assert (first.early_exit.use_early_exit, first.early_exit.early_exit_thres, first.early_exit.exit_layers) == \
        (True, 0.8, [2])
    assert first.early_exit.print_max_prob is False  # a false flag is sent as false and read as false


def test_request_client_reports_server_errors(served, tmp_path, capsys):
    url, _ = served
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "x"}) + "\n")
    assert request_client.main(["--url", url, "--prompt-file", str(prompts), "--exit-layers", "3"]) == 1
    assert "HTTP 400" in capsys.readouterr().err


def test_default_prompt_file_is_valid():
    assert len(request_client.read_prompts(request_client.DEFAULT_PROMPTS)) >= 1


def test_cli_non_interactive(served, capsys):
    url, recorder = served
    code = text_generation_cli.main(["--url", url, "--prompt", "hi", "--prompt", "yo", "--temperature", "0.5",
                                     "--top-p", "0.9", "--stop", "\n", "--stats"])
    out = capsys.readouterr().out
    assert code == 0 and "hi!" in out and "yo!" in out and "tokens/s" in out
    s = recorder.requests[0].sampling
    assert (s.temperature, s.top_p, s.stop_sequences, s.greedy) == (0.5, 0.9, ["\n"], False)


def test_cli_interactive_loop(served, monkeypatch, capsys):
    url, recorder = served
    lines = iter(["first", "second", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert text_generation_cli.main(["--url", url]) == 0
    assert [r.prompts for r in recorder.requests] == [["first"], ["second"]]
    assert "second!" in capsys.readouterr().out
