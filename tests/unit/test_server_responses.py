"""Response bodies: exit statistics, OpenAI pieces per token (SentencePiece-style leading spaces kept),
offsets and streaming chunks that spell the text even when a stop sequence cut a token."""

from megatron.text_generation.request import GenerationResult, parse_completions_request
from megatron.text_generation.server_responses import (
    Completion,
    api_response,
    completion_chunks,
    completion_response,
    exit_share,
)

VOCAB = {1: "\u2581Hello", 2: "\u2581world", 3: "!", 9: ""}


def sp_detokenize(ids):
    """SentencePiece-like: a word's leading space disappears at the start of the text."""
    return "".join(VOCAB[i] for i in ids).replace("\u2581", " ").lstrip(" ")


def _completion(body, detokenize=sp_detokenize):
    request, options = parse_completions_request(body)
    return Completion(request, options, "cmpl-1", 7, "m", 2, detokenize)


def _result(text, tokens, logprobs):
    segments = [[sp_detokenize([t]) for t in tokens]]
    return GenerationResult([text], segments, [tokens], [logprobs], [[2] * len(tokens)], len(tokens), 0.5)


def test_exit_share_and_api_shape():
    assert exit_share([[2, 4, 4], [4]]) == {"2": 0.25, "4": 0.75} and exit_share([]) == {}
    out = api_response(_result("Hello", [1], [-1.0]), 0.25)
    assert out["requst_time"] == 0.25 and out["tokens_per_s"] == 2.0 and out["exit_layers"] == [[2]]


def test_pieces_keep_leading_spaces_and_offsets():
    c = _completion({"prompt": "x", "max_tokens": 5, "logprobs": 1})
    result = _result("Hello world!", [1, 2, 3, 9], [-1.0, -2.0, -3.0, -4.0])  # 9: a stop token, no text
    assert c.pieces(result, 0) == ["Hello", " world", "!", ""]
    body = completion_response(result, c)
    choice = body["choices"][0]
    assert choice["logprobs"]["text_offset"] == [0, 5, 11, 12] and choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    chunks = list(completion_chunks(result, c))
    assert [ch["choices"][0]["text"] for ch in chunks] == ["Hello", " world", "!"]
    assert [ch["choices"][0]["logprobs"]["token_logprobs"] for ch in chunks] == [[-1.0], [-2.0], [-3.0]]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks] == [None, None, "stop"]


def test_stream_of_a_text_cut_by_a_stop_sequence():
    c = _completion({"prompt": "x", "max_tokens": 2, "stop": "rld"})
    chunks = list(completion_chunks(_result("Hello wo", [1, 2], [-1.0, -2.0]), c))
    assert [ch["choices"][0]["text"] for ch in chunks] == ["Hello", " wo"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_echoed_prompt_first_token_has_no_logprob():
    c = _completion({"prompt": "x", "max_tokens": 1, "logprobs": 0, "echo": True})
    body = completion_response(_result("Hello world", [1, 2], [-2.0]), c)
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]


def test_segments_used_without_a_tokenizer():
    c = _completion({"prompt": "x", "max_tokens": 2}, detokenize=None)
    assert c.pieces(_result("Hello world", [1, 2], [-1.0, -2.0]), 0) == ["Hello", "world"]
