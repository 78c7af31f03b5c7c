"""build_tokenizer: NullTokenizer, Hugging Face tokenizers, vocab padding, flag parsing and flag-named errors."""

import argparse
import gzip
import sys

import pytest

from megatron.tokenizer import (
    HuggingFaceTokenizer,
    TokenizerArgumentError,
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_args,
    padded_vocab_size,
)
from megatron.tokenizer.bundled import GPT2_MERGE_FILE, GPT2_VOCAB_FILE, KJV_SAMPLE_TXT, LLAMA_SP_MODEL

SAMPLE = "Hello world!  Unicode café 日本 😀\n\tcode = f(x) ** 2 # 42"


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.tokenize(" 5 17\n0\t999  1000 ") == [5, 17, 0, 999, 1000]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 17, 0]) == "5 17 0"
    assert (tok.eod, tok.vocab_size, tok.padded_vocab_size, tok.bos, tok.pad) == (1000, 1001, 1024, -1, -1)
    with pytest.raises(ValueError, match="integer"):
        tok.tokenize("1 two 3")
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        tok.tokenize("1 1001")


@pytest.mark.parametrize("vocab, divisible, tp, padded, expected", [
    (50257, 128, 1, None, 50304), (50257, 128, 2, None, 50432), (32005, 128, 1, None, 32128),
    (32005, 128, 2, None, 32256), (32005, 128, 4, None, 32256), (32000, 128, 1, None, 32000),
    (1001, 1, 1, None, 1001), (1001, 1, 8, None, 1008), (1001, 128, 1, 1500, 1500), (1001, 128, 2, 1002, 1002),
])
def test_padding_rule(vocab, divisible, tp, padded, expected):
    assert padded_vocab_size(vocab, divisible, tp, padded) == expected


@pytest.mark.parametrize("kwargs, flag", [
    (dict(padded=1000), "--padded-vocab-size"), (dict(padded=1003, tp=2), "--padded-vocab-size"),
    (dict(divisible=0), "--make-vocab-size-divisible-by"),
])
def test_padding_errors(kwargs, flag):
    with pytest.raises(TokenizerArgumentError, match=flag):
        padded_vocab_size(1001, kwargs.get("divisible", 128), kwargs.get("tp", 1), kwargs.get("padded"))


def test_build_applies_padding_flags():
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE, merge_file=GPT2_MERGE_FILE,
                          padded_vocab_size=51200, tp=4)
    assert tok.padded_vocab_size == 51200
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE, merge_file=GPT2_MERGE_FILE,
                          make_vocab_size_divisible_by=8, tp=2)
    assert tok.padded_vocab_size == 50272


def _bad_file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case, flag", [
    ("missing vocab", "--vocab-file"), ("missing merges", "--merge-file"), ("bad json", "--vocab-file"),
    ("json list", "--vocab-file"), ("bad merges", "--merge-file"), ("missing model", "--tokenizer-model"),
    ("bad model", "--tokenizer-model"), ("no vocab size", "--vocab-size"), ("unknown type", "--tokenizer-type"),
    ("no model", "--tokenizer-model"), ("bad hf", "--tokenizer-model"), ("empty hf dir", "--tokenizer-model"),
])
def test_bad_flags_name_the_flag(tmp_path, case, flag):
    bad_json = _bad_file(tmp_path, "v.json", b"{not json")
    builders = {
        "missing vocab": lambda: build_tokenizer("GPT2BPETokenizer", merge_file=GPT2_MERGE_FILE),
        "missing merges": lambda: build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE,
                                                  merge_file=tmp_path / "nope.txt"),
        "bad json": lambda: build_tokenizer("GPT2BPETokenizer", vocab_file=bad_json, merge_file=GPT2_MERGE_FILE),
        "json list": lambda: build_tokenizer("GPT2BPETokenizer", vocab_file=_bad_file(tmp_path, "l.json", b"[1]"),
                                             merge_file=GPT2_MERGE_FILE),
        "bad merges": lambda: build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE,
                                              merge_file=_bad_file(tmp_path, "m.txt", b"#version: 0.2\na b c\n")),
        "missing model": lambda: build_tokenizer("Llama2Tokenizer", tokenizer_model=tmp_path / "none.model"),
        "bad model": lambda: build_tokenizer("SentencePieceTokenizer", tokenizer_model=bad_json),
        "no vocab size": lambda: build_tokenizer("NullTokenizer"),
        "unknown type": lambda: build_tokenizer("BertWordPieceLowerCase"),
        "no model": lambda: build_tokenizer("HuggingFaceTokenizer"),
        "bad hf": lambda: build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bad_json),
        "empty hf dir": lambda: build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tmp_path),
    }
    with pytest.raises(TokenizerArgumentError, match=flag):
        builders[case]()


@pytest.fixture(scope="module")
def gpt2_hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_hf")
    (directory / "vocab.json").write_bytes(gzip.decompress(GPT2_VOCAB_FILE.with_suffix(".json.gz").read_bytes()))
    (directory / "merges.txt").write_bytes(gzip.decompress(GPT2_MERGE_FILE.with_suffix(".txt.gz").read_bytes()))
    return directory


def test_huggingface_directory_and_tokenizer_json(gpt2_hf_dir, tmp_path):
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE, merge_file=GPT2_MERGE_FILE)
    text = SAMPLE + KJV_SAMPLE_TXT.read_text(encoding="utf-8")[:3000]
    from_dir = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=gpt2_hf_dir)
    assert from_dir.tokenize(text) == ours.tokenize(text)
    assert (from_dir.eod, from_dir.vocab_size, from_dir.padded_vocab_size, from_dir.pad) == (50256, 50257, 50304, -1)
    assert from_dir.detokenize(from_dir.tokenize(text)) == text
    json_file = tmp_path / "tokenizer.json"
    from_dir.tokenizer.save(str(json_file))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|endoftext|>"}, "bos_token": "!"}')
    from_file = HuggingFaceTokenizer(json_file)
    assert from_file.tokenize(text) == ours.tokenize(text)
    assert (from_file.eos, from_file.bos) == (50256, 0)


def test_huggingface_missing_package_is_a_clear_error(gpt2_hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=gpt2_hf_dir)


def test_argparse_flags_and_defaults():
    parser = add_tokenizer_args(argparse.ArgumentParser())
    defaults = parser.parse_args([])
    assert (defaults.make_vocab_size_divisible_by, defaults.padded_vocab_size, defaults.vocab_extra_ids) == (128, None, 0)
    with pytest.raises(TokenizerArgumentError, match="--tokenizer-type"):
        build_tokenizer_from_args(defaults)
    args = parser.parse_args(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(LLAMA_SP_MODEL),
                              "--vocab-extra-ids", "2", "--make-vocab-size-divisible-by", "64"])
    tok = build_tokenizer_from_args(args, tp=2)
    assert (tok.vocab_size, tok.padded_vocab_size, tok.eod) == (32007, 32128, 32002)
    args = parser.parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--padded-vocab-size", "64"])
    assert build_tokenizer_from_args(args).padded_vocab_size == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokenizer-type", "NoSuchTokenizer"])
