"""GPT-2 BPE: our ids equal Hugging Face's GPT-2 tokenizer built from the same bundled files."""

import gzip
import pickle

import pytest

from megatron.tokenizer import GPT2BPETokenizer, build_tokenizer
from megatron.tokenizer.bundled import GPT2_MERGE_FILE, GPT2_VOCAB_FILE, KJV_CORPUS, KJV_SAMPLE, iter_corpus

VARIED_TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\t\tnew\nlines\n\n\nand\r\nwindows\r\n",
    "many     spaces   between    words",
    "trailing spaces then newline   \n  indented",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "Emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 and ZWJ, combining e\u0301 and \u00a0nbsp \u3000 ideographic space",
    "def f(x):\n    return {'a': x ** 2, \"b\": [1, 2, 3]}  # comment\n\tif x != 0: pass",
    "Numbers 1234567890 3.14159 -42 1e-9 ½ ² ٣ 0x1F 1,000,000",
    "Contractions: don't, I'm, we'll, they've, she'd, it's, O'Neil's, 'quoted'",
    "Punctuation!!! ??? ... --- ((( ))) <html><body>&amp;</body></html> @user #tag $5 100%",
    "Control \x00\x01\x1f chars and \ufeff BOM and \u2028 line separator",
]


@pytest.fixture(scope="module")
def ours():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB_FILE, merge_file=GPT2_MERGE_FILE)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    # transformers' GPT-2 constructors given vocab_file= build an empty tokenizer: from_pretrained on a
    # directory with HF's file names is the reliable route.
    directory = tmp_path_factory.mktemp("hf_gpt2")
    (directory / "vocab.json").write_bytes(gzip.decompress(GPT2_VOCAB_FILE.with_suffix(".json.gz").read_bytes()))
    (directory / "merges.txt").write_bytes(gzip.decompress(GPT2_MERGE_FILE.with_suffix(".txt.gz").read_bytes()))
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(directory))
    assert len(tok) == 50257
    return tok


def test_hello_world_and_specials(ours):
    assert ours.tokenize("Hello world") == [15496, 995]
    assert ours.vocab_size == 50257 and ours.padded_vocab_size == 50304
    assert ours.eod == ours.eos == ours.bos == 50256 == ours.vocab["<|endoftext|>"]
    assert ours.pad == -1 and ours.inv_vocab[15496] == "Hello"


@pytest.mark.parametrize("text", VARIED_TEXTS, ids=[f"text{i}" for i in range(len(VARIED_TEXTS))])
def test_matches_hf_and_round_trips(ours, hf, text):
    ids = ours.tokenize(text)
    assert ids == hf(text)["input_ids"]
    assert ours.detokenize(ids) == text


def test_matches_hf_on_bundled_corpus(ours, hf):
    docs = list(iter_corpus(KJV_CORPUS))
    assert len(docs) == 1189
    text = "\n\n".join(docs[::7])
    ids = ours.tokenize(text)
    assert ids == hf(text)["input_ids"]
    assert ours.detokenize(ids) == text


def test_cache_does_not_change_results(ours, tmp_path):
    text = "\n".join(iter_corpus(KJV_SAMPLE))
    fresh = GPT2BPETokenizer(GPT2_VOCAB_FILE, GPT2_MERGE_FILE)
    first = fresh.tokenize(text)
    assert fresh.tokenize(text) == first == ours.tokenize(text)
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone._cache == {} and clone.tokenize(text) == first


def test_plain_and_gz_file_names_are_equivalent(tmp_path):
    plain_vocab, plain_merges = tmp_path / "v.json", tmp_path / "m.txt"
    plain_vocab.write_bytes(gzip.decompress(GPT2_VOCAB_FILE.with_suffix(".json.gz").read_bytes()))
    plain_merges.write_bytes(gzip.decompress(GPT2_MERGE_FILE.with_suffix(".txt.gz").read_bytes()))
    plain = GPT2BPETokenizer(plain_vocab, plain_merges)
    gz = GPT2BPETokenizer(str(GPT2_VOCAB_FILE) + ".gz", str(GPT2_MERGE_FILE) + ".gz")
    text = VARIED_TEXTS[7] + VARIED_TEXTS[9]
    assert plain.tokenize(text) == gz.tokenize(text)


def test_invalid_utf8_decodes_with_replacement(ours):
    # A lone first byte of a 4-byte emoji cannot decode; Megatron replaces rather than raising.
    emoji_ids = ours.tokenize("😀")
    assert len(emoji_ids) > 1
    assert ours.detokenize(emoji_ids[:1]) == "\ufffd"
