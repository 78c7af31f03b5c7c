"""Request parsing: EE-LLM's PUT /api fields (its MegatronGenerate.put) with that parser's bugs fixed, and OpenAI
completions."""

import pytest

from megatron.text_generation.request import (
    EarlyExitParams,
    GenerationRequest,
    RequestError,
    SamplingParams,
    ServerLimits,
    broadcast_request,
    parse_api_request,
    parse_completions_request,
    show_value,
)


def test_dataclass_defaults_are_independent():
    a, b = SamplingParams(), SamplingParams()
    a.stop_sequences.append("x")
    assert b.stop_sequences == [] and EarlyExitParams().exit_layers == []
    assert GenerationRequest(["p"]).early_exit.early_exit_thres == 1.0


def test_api_defaults_match_ee_llm_but_never_exit():
    req = parse_api_request({"prompts": "hello"})
    s, ee = req.sampling, req.early_exit
    assert req.prompts == ["hello"]
    assert (s.tokens_to_generate, s.random_seed, s.logprobs, s.echo_prompts) == (64, 1234, False, False)
    assert s.greedy and s.top_k == 1 and s.top_p == 0.0  # EE-LLM's default temperature 0 = greedy
    assert ee.use_early_exit is False and ee.early_exit_thres == 1.0 and ee.exit_layers == []


def test_booleans_by_value_not_key_presence():
    req = parse_api_request({"prompts": ["a"], "use_early_exit": False, "print_max_prob": False})
    assert req.early_exit.use_early_exit is False and req.early_exit.print_max_prob is False
    req = parse_api_request({"prompts": ["a"], "use_early_exit": True, "print_max_prob": True})
    assert req.early_exit.use_early_exit is True and req.early_exit.print_max_prob is True


def test_int_threshold_accepted_and_explicit_threshold_without_flag():
    req = parse_api_request({"prompts": ["a"], "early_exit_thres": 1})
    assert req.early_exit.early_exit_thres == 1.0 and not req.early_exit.use_early_exit
    assert parse_api_request({"prompts": ["a"], "early_exit_thres": 0, "use_early_exit": True}).early_exit.early_exit_thres == 0.0


def test_sampling_fields():
    req = parse_api_request({"prompts": ["a", "b"], "temperature": 0.7, "top_p": 1, "top_p_decay": 0.5,
                             "top_p_bound": 0.2, "random_seed": 7, "stop_sequences": ["\n\n", "END"],
                             "stop_on_eol": True, "tokens_to_generate": 0, "echo_prompts": True})
    s = req.sampling
    assert (s.temperature, s.greedy, s.top_k, s.top_p, s.top_p_decay, s.top_p_bound) == (0.7, False, 0, 1.0, 0.5, 0.2)
    assert s.stop_sequences == ["\n\n", "END", "\n"] and s.random_seed == 7
    assert s.tokens_to_generate == 0 and s.logprobs  # scoring returns the prompt's log-probs
    beam = parse_api_request({"prompts": "a", "beam_width": 3, "length_penalty": 2, "temperature": 1}).sampling
    assert beam.beam_width == 3 and beam.length_penalty == 2.0


@pytest.mark.parametrize("body, field", [
    ({}, "prompts"),
    ({"prompts": []}, "prompts"),
    ({"prompts": ["x"] * 129}, "prompts"),
    ({"prompts": [1]}, "prompts"),
    ({"prompts": [""]}, "prompts"),
    ({"prompts": "a", "max_len": 5}, "max_len"),
    ({"sentences": ["a"]}, "sentences"),
    ({"prompts": "a", "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": "a", "tokens_to_generate": 2.5}, "tokens_to_generate"),
    ({"prompts": "a", "logprobs": "yes"}, "logprobs"),
    ({"prompts": "a", "use_early_exit": 1}, "use_early_exit"),
    ({"prompts": "a", "print_max_prob": "true"}, "print_max_prob"),
    ({"prompts": "a", "early_exit_thres": "0.5"}, "early_exit_thres"),
    ({"prompts": "a", "early_exit_thres": 40.0}, "early_exit_thres"),
    ({"prompts": "a", "exit_layers": [1.5]}, "exit_layers"),
    ({"prompts": "a", "exit_layers": [0]}, "exit_layers"),
    ({"prompts": "a", "top_k": 1001}, "top_k"),
    ({"prompts": "a", "top_k": 5, "top_p": 0.5}, "top_p"),
    ({"prompts": "a", "top_p": 1.5}, "top_p"),
    ({"prompts": "a", "top_p_decay": 0.5}, "top_p_decay"),  # EE-LLM: NameError
    ({"prompts": "a", "top_p": 0.5, "top_p_bound": 0.6}, "top_p_bound"),
    ({"prompts": "a", "temperature": 101}, "temperature"),
    ({"prompts": "a", "temperature": True}, "temperature"),
    ({"prompts": "a", "random_seed": -1}, "random_seed"),
    ({"prompts": "a", "stop_sequences": [""]}, "stop_sequences"),
    ({"prompts": "a", "stop_sequences": [3]}, "stop_sequences"),
    ({"prompts": ["a", "b"], "beam_width": 2}, "beam_width"),
    ({"prompts": "a", "beam_width": 0}, "beam_width"),
    ({"prompts": "a", "method": "magic"}, "method"),
    ({"prompts": "a", "temprature": 1.0}, "temprature"),
    ([1, 2], "body"),
    ({"prompts": "a", "use_early_exit": True, "confidence": "max"}, "confidence"),
    ({"prompts": "a", "use_early_exit": True, "confidence": 1}, "confidence"),
    ({"prompts": "a", "use_early_exit": True, "threshold_decay": -1}, "threshold_decay"),
    ({"prompts": "a", "use_early_exit": True, "threshold_decay": "fast"}, "threshold_decay"),
    ({"prompts": "a", "confidence": "margin"}, "confidence"),  # full depth: nothing would use it
    ({"prompts": "a", "decoding": "speculative", "threshold_decay": 2}, "threshold_decay"),
    # issue 15: values that used to pass and then fail inside generation (on one rank of a pipeline)
    ({"prompts": "a", "stop_token_ids": [100000000000000000000]}, "stop_token_ids"),  # OverflowError
    ({"prompts": "a", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompts": "a", "stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"prompts": "a", "beam_width": 10**30}, "beam_width"),
    ({"prompts": "a", "beam_width": 17}, "beam_width"),  # over the default --max-beam-width
    ({"prompts": "a", "beam_width": 3, "length_penalty": -1e308}, "length_penalty"),  # ZeroDivisionError
    ({"prompts": "a", "temperature": 5e-324}, "temperature"),  # NaN probabilities
    ({"prompts": "a", "random_seed": 2**64}, "random_seed"),
    ({"prompts": "a", "beam_width": 2, "use_early_exit": True}, "use_early_exit"),
    ({"prompts": "a", "beam_width": 2, "decoding": "speculative"}, "decoding"),
    ({"prompts": "a", "beam_width": 2, "prevent_newline_after_colon": True}, "prevent_newline_after_colon"),
    ({"prompts": "a", "beam_width": 2, "tokens_to_generate": 0}, "beam_width"),
    ({"prompts": "a", "tokens_to_generate": 2**31}, "tokens_to_generate"),
    ({"prompts": "a", "recompute_cap": 10**20, "use_early_exit": True}, "recompute_cap"),
    ({"prompts": "a", "use_early_exit": True, "threshold_decay": 1e300}, "threshold_decay"),
    ({"prompts": "a", "exit_layers": [10**30]}, "exit_layers"),
    ({"prompts": ["\ud800"]}, "prompts"),  # a lone surrogate: no tokenizer can encode it
    ({"prompts": "a", "stop_sequences": ["x\udfff"]}, "stop_sequences"),
    ({"prompts": "a", "stop_sequences": ["s"] * 65}, "stop_sequences"),
    ({"prompts": "a", "method": ["recompute"]}, "method"),
    ({"prompts": "a", "decoding": {"x": 1}}, "decoding"),
    ({"prompts": "a", "x" * 10_000: 1}, "x" * 100),
])
def test_api_invalid_field_names_the_field(body, field):
    with pytest.raises(RequestError) as err:
        parse_api_request(body)
    assert err.value.field == field and err.value.reason


def test_completions_request():
    req, opts = parse_completions_request({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0,
                                           "stop": "\n", "seed": 3, "logprobs": 1, "echo": True, "stream": True,
                                           "early_exit_thres": 0.8, "use_early_exit": True, "exit_layers": [2]})
    s, ee = req.sampling, req.early_exit
    assert (s.tokens_to_generate, s.greedy, s.stop_sequences, s.random_seed, s.logprobs, s.echo_prompts) == \
        (5, True, ["\n"], 3, True, True)
    assert (ee.use_early_exit, ee.early_exit_thres, ee.exit_layers) == (True, 0.8, [2])
    assert opts == {"model": "m", "stream": True, "logprobs": 1, "echo": True}
    req, opts = parse_completions_request({"prompt": ["a", "b"]})
    assert req.sampling.temperature == 1.0 and req.sampling.top_p == 0.0 and not req.sampling.greedy
    assert req.sampling.tokens_to_generate == 16 and opts["stream"] is False


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "temperature": 1e-9}, "temperature"),
    ({"prompt": "a", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "model": 5}, "model"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "a", "decoding": "early_exit", "confidence": "cos"}, "confidence"),
    ({"prompt": "a", "decoding": "early_exit", "threshold_decay": float("inf")}, "threshold_decay"),
    ({"prompt": "a", "threshold_decay": 1.0}, "threshold_decay"),
])
def test_completions_invalid(body, field):
    with pytest.raises(RequestError) as err:
        parse_completions_request(body)
    assert err.value.field == field


def test_confidence_measure_and_threshold_decay():
    ee = parse_api_request({"prompts": "a", "use_early_exit": True}).early_exit
    assert (ee.confidence, ee.threshold_decay) == ("top1", None)
    for measure in ("top1", "margin", "entropy", "cosine"):
        body = {"prompts": "a", "decoding": "early_exit", "confidence": measure, "threshold_decay": 4}
        ee = parse_api_request(body).early_exit
        assert (ee.confidence, ee.threshold_decay, ee.use_early_exit) == (measure, 4.0, True)
    ee = parse_api_request({"prompts": "a", "use_early_exit": True, "threshold_decay": None}).early_exit
    assert ee.threshold_decay is None
    req, _ = parse_completions_request({"prompt": "a", "use_early_exit": True, "early_exit_thres": 0.4,
                                        "confidence": "entropy", "threshold_decay": 0.5})
    assert (req.early_exit.confidence, req.early_exit.threshold_decay, req.early_exit.early_exit_thres) == \
        ("entropy", 0.5, 0.4)


def test_bounds_accept_their_extremes():
    req = parse_api_request({"prompts": "a", "random_seed": 2**64 - 1, "temperature": 1e-4, "beam_width": 16,
                             "length_penalty": -10, "tokens_to_generate": 3, "stop_token_ids": [0, 2**31 - 1]})
    s = req.sampling
    assert (s.random_seed, s.temperature, s.beam_width, s.length_penalty) == (2**64 - 1, 1e-4, 16, -10.0)
    wide = ServerLimits(max_beam_width=64, max_prompts=200)
    assert parse_api_request({"prompts": "a", "beam_width": 64}, wide).sampling.beam_width == 64
    assert len(parse_api_request({"prompts": ["a"] * 200}, wide).prompts) == 200
    with pytest.raises(RequestError, match="at most 2"):
        parse_completions_request({"prompt": ["a"] * 3}, ServerLimits(max_prompts=2))


def test_error_messages_abbreviate_the_clients_values():
    deep = [1]
    for _ in range(5000):  # a plain repr of this raises RecursionError
        deep = [deep]
    with pytest.raises(RequestError) as err:
        parse_api_request({"prompts": "a", "stop_token_ids": deep})
    assert err.value.field == "stop_token_ids" and len(err.value.reason) < 200
    with pytest.raises(RequestError) as err:
        parse_api_request({"prompts": "a", "top_k": "k" * 100_000})
    assert len(err.value.reason) < 200
    assert show_value(10**1000).count("0") < 60


def test_server_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_beam_width"):
        ServerLimits(max_beam_width=0)
    with pytest.raises(ValueError, match="read_timeout_s"):
        ServerLimits(read_timeout_s=float("nan"))


def test_broadcast_is_identity_in_one_process():
    req = parse_api_request({"prompts": "a"})
    assert broadcast_request(req, None) is req
