"""Rank 0's checks of a request against the model (request_checks.check_request): the tokenizer's
refusals, token-less prompts, ids outside the vocabulary, beams wider than it, the context length, the
KV-cache budget (--max-batch-tokens) and a newline ban the tokenizer cannot express."""

import pytest

from megatron.text_generation.request import RequestError, ServerLimits, parse_api_request
from megatron.text_generation.request_checks import check_request
from megatron.text_generation.server import ModelInfo
from megatron.tokenizer.null import NullTokenizer

TOKENIZER = NullTokenizer(50)  # ids 0..49, eod 50
INFO = ModelInfo(num_layers=4, exit_layers=[1, 3], pp=2, max_positions=64, vocab_size=TOKENIZER.vocab_size,
                 tokenize=TOKENIZER.tokenize, detokenize=TOKENIZER.detokenize)
LIMITS = ServerLimits(max_batch_tokens=256)


def _check(body, info=INFO, limits=LIMITS):
    check_request(parse_api_request(body, limits), info, limits)


@pytest.mark.parametrize("body, field, reason", [
    ({"prompts": ["1 two 3"]}, "prompts", "tokenizer rejects"),
    ({"prompts": ["1" * 100_000]}, "prompts", "tokenizer rejects"),  # over Python's int-string limit
    ({"prompts": ["77"]}, "prompts", "tokenizer rejects"),
    ({"prompts": ["1 2", "  \t "]}, "prompts", "prompt 1 is no tokens"),
    ({"prompts": ["1"], "stop_token_ids": [51]}, "stop_token_ids", "outside the vocabulary"),
    ({"prompts": ["1"], "exit_layers": [2]}, "exit_layers", "no exit"),
    ({"prompts": ["1 2 3"], "tokens_to_generate": 62}, "tokens_to_generate", "at most 61"),
    ({"prompts": ["1 2"] * 5, "tokens_to_generate": 60}, "prompts", "--max-batch-tokens 256"),
    ({"prompts": ["1 2"], "tokens_to_generate": 60, "beam_width": 8}, "beam_width", "--max-batch-tokens"),
    ({"prompts": ["1"], "prevent_newline_after_colon": True, "tokens_to_generate": 2},
     "prevent_newline_after_colon", "single-token newline"),
    ({"prompts": ["1"], "decoding": "speculative", "draft_exit_layer": 2}, "draft_exit_layer", "no exit"),
])
def test_refused_before_any_rank_starts(body, field, reason):
    with pytest.raises(RequestError) as err:
        _check(body)
    assert err.value.field == field and reason in err.value.reason, err.value.reason


def test_beam_wider_than_the_vocabulary():
    tiny = NullTokenizer(3)
    info = ModelInfo(num_layers=4, vocab_size=tiny.vocab_size, tokenize=tiny.tokenize, max_positions=64)
    with pytest.raises(RequestError, match="more than the vocabulary's 4 tokens") as err:
        _check({"prompts": ["1"], "beam_width": 5, "tokens_to_generate": 2}, info)
    assert err.value.field == "beam_width"
    _check({"prompts": ["1"], "beam_width": 4, "tokens_to_generate": 2}, info)


def test_valid_requests_pass():
    _check({"prompts": ["1 2", "3"], "tokens_to_generate": 60, "stop_token_ids": [50]})
    _check({"prompts": [""], "add_BOS": True, "tokens_to_generate": 3})  # BOS is the one token
    _check({"prompts": ["1 2"], "tokens_to_generate": 4, "beam_width": 16})
    _check({"prompts": ["a b"]}, ModelInfo())  # without a tokenizer (a fake model) there is nothing to check
