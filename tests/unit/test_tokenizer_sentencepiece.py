"""SentencePieceTokenizer and Llama2Tokenizer: ids equal the `sentencepiece` package's on the bundled Llama model."""

import gzip
import pickle

import pytest
import sentencepiece

from megatron.tokenizer import Llama2Tokenizer, SentencePieceTokenizer, build_tokenizer
from megatron.tokenizer.bundled import KJV_SAMPLE, LLAMA_SP_MODEL, iter_corpus

TEXTS = [
    "Hello world",
    "",
    "two  spaces,   three,    four and a tab\there\nand a newline",
    "  leading spaces and trailing  ",
    "Unicode: naïve café, Straße, 日本語, русский, emoji 😀👍🏽 (byte fallback: \u2fd5 \U0001d11e)",
    "def f(x):\n    return x ** 2  # code",
    "Numbers 1234567890 3.14159 -42",
    "\n".join(list(iter_corpus(KJV_SAMPLE))[:2]),
]


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(LLAMA_SP_MODEL))


@pytest.fixture(scope="module")
def spt():
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=LLAMA_SP_MODEL)


@pytest.fixture(scope="module")
def llama():
    return build_tokenizer("Llama2Tokenizer", tokenizer_model=LLAMA_SP_MODEL)


def test_bundled_model_is_llama_format(sp):
    assert (sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (32000, 1, 2, -1, 0)


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_ids_equal_sentencepiece(sp, spt, llama, text):
    expected = sp.encode(text)
    assert spt.tokenize(text) == expected
    assert llama.tokenize(text) == [1] + expected
    assert llama.tokenize(text, bos=False, eos=True) == expected + [2]
    assert llama.detokenize(llama.tokenize(text)) == sp.decode(expected)
    assert spt.detokenize(expected) == sp.decode(expected)


def test_appended_specials_follow_megatron(spt):
    # Llama's model has no pad piece but does have <s>/</s>: <PAD> is appended, bos/eos reuse pieces 1/2.
    expected = {"<CLS>": 32000, "<SEP>": 32001, "<EOD>": 32002, "<MASK>": 32003, "<PAD>": 32004}
    assert {t: spt.vocab[t] for t in expected} == expected
    assert (spt.cls, spt.sep, spt.eod, spt.mask, spt.pad, spt.bos, spt.eos) == (32000, 32001, 32002, 32003, 32004, 1, 2)
    assert spt.vocab_size == 32005 and spt.inv_vocab[32002] == "<EOD>"
    assert spt.padded_vocab_size == 32128
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=LLAMA_SP_MODEL, tp=2).padded_vocab_size == 32256
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=LLAMA_SP_MODEL, tp=4).padded_vocab_size == 32256


def test_extra_ids(sp):
    tok = SentencePieceTokenizer(LLAMA_SP_MODEL, vocab_extra_ids=3)
    assert tok.additional_special_tokens_ids == [32005, 32006, 32007]
    assert tok.vocab_size == 32008 and tok.inv_vocab[32007] == "<extra_id_2>"
    assert tok.tokenize("a<extra_id_1>b") == sp.encode("a") + [32006] + sp.encode("b")


def test_tokenize_splits_on_special_strings(sp, spt):
    text = "first doc<EOD>second <s>doc</s><MASK><CLS>"
    expected = (sp.encode("first doc") + [32002] + sp.encode("second ") + [1] + sp.encode("doc") + [2, 32003, 32000])
    assert spt.tokenize(text) == expected
    # Megatron writes specials between spaces when decoding.
    assert spt.detokenize(sp.encode("a b") + [32002] + sp.encode("c")) == "a b <EOD> c"


def test_llama2_specials(llama):
    assert (llama.vocab_size, llama.padded_vocab_size, llama.eod, llama.bos, llama.eos) == (32000, 32000, 2, 1, 2)
    assert (llama.cls, llama.sep, llama.mask, llama.pad) == (-1, -1, -1, -1)
    # Plain SP: special-token strings in the text are ordinary text, not ids.
    assert 2 not in llama.tokenize("a</s>b", bos=False)


def test_gzipped_model_and_pickling(tmp_path, spt):
    gz = tmp_path / "tokenizer.model.gz"
    gz.write_bytes(gzip.compress(LLAMA_SP_MODEL.read_bytes()))
    text = TEXTS[4] + "<EOD>" + TEXTS[2]
    assert SentencePieceTokenizer(tmp_path / "tokenizer.model").tokenize(text) == spt.tokenize(text)
    for tok in (spt, Llama2Tokenizer(LLAMA_SP_MODEL)):
        assert pickle.loads(pickle.dumps(tok)).tokenize(text) == tok.tokenize(text)
