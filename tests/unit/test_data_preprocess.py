"""tools/preprocess_data.py: 2 workers write the same bytes as 1, the tokens are the tokenizer's, .txt and .gz
inputs, sentence splitting, and clear errors."""

import gzip
import json
import os
import sys

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset
from megatron.tokenizer import build_tokenizer
from tools import preprocess_data
from tools.preprocess_data import PreprocessError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "corpus", "kjv_sample.jsonl")
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(ROOT, "data/gpt2/gpt2-vocab.json"),
        "--merge-file", os.path.join(ROOT, "data/gpt2/gpt2-merges.txt")]


def _gpt2():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2[3], merge_file=GPT2[5])


def _run(tmp_path, name, *flags, input=CORPUS, tokenizer=GPT2):
    out = preprocess_data.main(["--input", str(input), "--output-prefix", str(tmp_path / name), *tokenizer, *flags])
    return out


def test_two_workers_write_the_same_bytes_as_one(tmp_path, capsys):
    one = _run(tmp_path, "one", "--append-eod", "--workers", "1")["text"]
    two = _run(tmp_path, "two", "--append-eod", "--workers", "2", "--chunk-size", "1", "--log-interval", "2")["text"]
    assert one.endswith("one_text_document")
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()
    err = capsys.readouterr().err
    assert "Processed 2 documents (" in err and "docs/s" in err and "MB/s" in err
    tok = _gpt2()
    texts = [json.loads(line)["text"] for line in open(CORPUS, encoding="utf-8") if line.strip()]
    ds = IndexedDataset(one)
    assert ds.dtype == np.uint16 and len(ds) == len(texts) and ds.doc_idx.tolist() == list(range(len(texts) + 1))
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]


def test_txt_and_gz_inputs(tmp_path):
    blocks = ["Genesis 1\nIn the beginning.", "Second   block\nwith two lines.", "Third."]
    txt = tmp_path / "in.txt"
    txt.write_text("\n\n" + "\n\n\n".join(blocks) + "\n", encoding="utf-8")
    gz = tmp_path / "in.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    a = _run(tmp_path, "t", input=txt)["text"]
    b = _run(tmp_path, "g", input=gz)["text"]
    tok = _gpt2()
    assert [x.tolist() for x in IndexedDataset(a)] == [tok.tokenize(t) for t in blocks]
    assert open(a + ".bin", "rb").read() == open(b + ".bin", "rb").read()


def test_null_tokenizer_several_keys_and_empty_documents(tmp_path):
    src = tmp_path / "n.jsonl"
    rows = [{"text": "1 2 3", "title": "7"}, {"text": "", "title": "8 9"}, {"text": "4", "title": ""}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    out = _run(tmp_path, "n", "--json-keys", "text", "title", "--append-eod", input=src, tokenizer=null)
    eod = build_tokenizer("NullTokenizer", vocab_size=100).eod
    assert [x.tolist() for x in IndexedDataset(out["text"])] == [[1, 2, 3, eod], [4, eod]]
    assert [x.tolist() for x in IndexedDataset(out["title"])] == [[7, eod], [8, 9, eod]]


def test_split_sentences_writes_one_sequence_per_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_data, "sentence_splitter",
                        lambda lang, keep: lambda text: [s for s in text.split(".") if s.strip()])
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": "1 2. 3. 4 5 6."}) + "\n" + json.dumps({"text": "7."}) + "\n")
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    for workers in ("1", "2"):
        out = _run(tmp_path, f"s{workers}", "--split-sentences", "--append-eod", "--workers", workers,
                   input=src, tokenizer=null)
        ds = IndexedDataset(out["text"])
        assert out["text"].endswith("_text_sentence")
        assert ds.sizes.tolist() == [2, 1, 4, 2] and ds.doc_idx.tolist() == [0, 3, 4]


def test_split_sentences_without_nltk_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(PreprocessError, match="--split-sentences needs nltk: pip install nltk"):
        preprocess_data.sentence_splitter("english", False)


def test_missing_key_and_bad_json_name_the_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "1"}) + "\n" + json.dumps({"body": "2"}) + "\n")
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: no key 'text'; set --json-keys"):
        _run(tmp_path, "bad", input=src, tokenizer=null)
    assert not os.path.exists(str(tmp_path / "bad_text_document.idx"))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    src.write_text("{not json\n")
    with pytest.raises(PreprocessError, match="bad.jsonl:1: not valid JSON"):
        _run(tmp_path, "bad", input=src, tokenizer=null)


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "caf\xe9"}', r"not valid UTF-8 \(byte 0xe9 at character 14\); re-encode the file as UTF-8"),
    (b"[1, 2]", r"expected a JSON object with key\(s\) \['text'\], got an array; write one object per line"),
    (b"5", "expected a JSON object .* got a number"),
    (b'{"text": 3}', r"key 'text' holds a number; it must be a string \(or a list of strings"),
    (b'{"text": null}', "key 'text' holds null; it must be a string"),
    (b'{"text": {"a": "1"}}', "key 'text' holds an object; it must be a string"),
    (b'{"text": ["1", 2]}', "key 'text' holds a list holding a number; it must be a string"),
    (b"[" * 100000, "JSON nested too deeply to read"),
], ids=["utf8", "array", "number", "int", "null", "dict", "list-of-int", "deep"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_lines_name_the_file_and_line(tmp_path, line, reason, workers):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "1"}\n' + line + b'\n{"text": "2"}\n')
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    with pytest.raises(PreprocessError, match=f"bad.jsonl:2: {reason}"):
        _run(tmp_path, "bad", "--workers", workers, input=src, tokenizer=null)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing published, no staged files left


def test_invalid_utf8_in_gzipped_text_names_the_line(tmp_path):
    src = tmp_path / "bad.txt.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"1 2\n\n3\n4 \xff 5\n")
    with pytest.raises(PreprocessError, match=r"bad.txt.gz:4: not valid UTF-8 \(byte 0xff at character 3\)"):
        _run(tmp_path, "bad", input=src, tokenizer=["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])
