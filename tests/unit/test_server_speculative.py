"""The server's side of self-speculative decoding and the playground, end to end in one process with a
tiny random-weights model: ``decoding: speculative`` in ``PUT /api`` and (as an extra) in
``POST /v1/completions`` answers the full-depth text with the acceptance statistics, bad speculative
fields are 400s naming the field, ``token_pieces`` spell the text, the page and its files are served
(and nothing else from disk), and the CLI / request client send the new flags."""

import json

import pytest

from megatron.testing.server import PROMPT, call
from tools import request_client, text_generation_cli

# ``served`` (tests/conftest.py): the server over megatron.testing.server.FLAGS' tiny model, exits at 1 and 3


def api(srv, **fields):
    status, _, body = call(srv, "PUT", "/api", {"prompts": [PROMPT, "7 7"], "tokens_to_generate": 10, **fields})
    return status, json.loads(body)


def test_api_speculative_answers_the_full_depth_text_with_statistics(served):
    _, full = api(served)
    status, fast = api(served, decoding="speculative", draft_exit_layer=3, num_speculative_tokens=3,
                       token_pieces=True)
    assert status == 200 and fast["text"] == full["text"] and "speculative" not in full
    stats = fast["speculative"]
    assert stats["draft_exit_layer"] == 3 and stats["num_speculative_tokens"] == 3
    assert 0 < stats["accepted"] <= stats["drafted"]
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    assert fast["tokens_per_s"] > 0 and set(fast["exit_share"]) <= {"3", "4"}
    assert ["".join(p) for p in fast["token_pieces"]] == [" " + t for t in fast["text"]]  # continue the prompt
    assert [len(p) for p in fast["token_pieces"]] == [len(e) for e in fast["exit_layers"]] == [10, 10]
    assert api(served, decoding="early_exit", early_exit_thres=0.0)[1]["exit_share"] == {"1": 1.0}


def test_openai_completions_take_the_speculative_extras(served):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    _, _, plain = call(served, "POST", "/v1/completions", body)
    status, _, fast = call(served, "POST", "/v1/completions", {**body, "decoding": "speculative",
                                                               "num_speculative_tokens": 2})
    fast = json.loads(fast)
    assert status == 200 and fast["choices"][0]["text"] == json.loads(plain)["choices"][0]["text"]
    assert fast["speculative"]["draft_exit_layer"] == 1 and "tokens_per_s" in fast


@pytest.mark.parametrize("fields, field", [
    ({"decoding": "speculative", "draft_exit_layer": 2}, "draft_exit_layer"),
    ({"decoding": "speculative", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"decoding": "turbo"}, "decoding"),
    ({"decoding": "speculative", "use_early_exit": True}, "use_early_exit"),
    ({"decoding": "full", "num_speculative_tokens": 3}, "num_speculative_tokens"),
    ({"token_pieces": "yes"}, "token_pieces"),
])
def test_bad_speculative_fields_are_400_naming_the_field(served, fields, field):
    status, body = api(served, **fields)
    assert status == 400 and body["field"] == field, body


def test_playground_page_and_files_are_served(served):
    status, kind, page = call(served, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and 'id="generate"' in page
    assert '/static/playground.js' in page and '/static/playground.css' in page
    for name, kind_prefix in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        status, kind, text = call(served, "GET", f"/static/{name}")
        assert status == 200 and kind.startswith(kind_prefix) and len(text) > 100
    assert call(served, "GET", "/playground")[2] == page
    for path in ("/static/../server.py", "/static/missing.js", "/static/%2e%2e/server.py", "/static/", "/nope"):
        assert call(served, "GET", path)[0] == 404, path


def test_cli_and_client_send_the_decoding_flags(served, capsys):
    url = served.url + "/api"
    assert text_generation_cli.main(["--url", url, "--prompt", PROMPT, "--tokens", "6", "--decoding", "speculative",
                                      "--draft-exit-layer", "3", "--num-speculative-tokens", "2", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "speculative:" in out and "drafts from exit 3 accepted" in out and "tokens/s" in out
    parser = request_client.add_request_flags(request_client.argparse.ArgumentParser(), tokens=5)
    args = request_client.parse_request_flags(parser, ["--decoding", "speculative", "--num-speculative-tokens", "5"])
    assert request_client.early_exit_fields(args) == {"decoding": "speculative", "num_speculative_tokens": 5}
    args = request_client.parse_request_flags(parser, ["--use-early-exit", "--threshold", "0.5"])
    assert request_client.early_exit_fields(args)["use_early_exit"] is True
    for bad in (["--use-early-exit", "--decoding", "full"], ["--draft-exit-layer", "1"]):
        with pytest.raises(SystemExit):
            request_client.parse_request_flags(parser, bad)
    assert "need --decoding speculative" in capsys.readouterr().err
