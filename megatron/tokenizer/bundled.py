"""Paths of the real assets bundled under data/ (see data/README.md for provenance and licences).

Tokenizer files are passed to build_tokenizer as they are (the GPT-2 files are stored gzip-compressed and
read transparently). The King James Bible corpus is JSON lines, one chapter per document: `iter_corpus`
reads the full gzip-compressed corpus or the small uncompressed sample.
"""

import gzip
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
GPT2_VOCAB_FILE = DATA_DIR / "gpt2" / "gpt2-vocab.json"
GPT2_MERGE_FILE = DATA_DIR / "gpt2" / "gpt2-merges.txt"
LLAMA_SP_MODEL = DATA_DIR / "llama_sp" / "tokenizer.model"
KJV_CORPUS = DATA_DIR / "corpus" / "kjv.jsonl.gz"
KJV_SAMPLE = DATA_DIR / "corpus" / "kjv_sample.jsonl"
KJV_SAMPLE_TXT = DATA_DIR / "corpus" / "kjv_sample.txt"


def iter_corpus(path=KJV_CORPUS, key: str = "text"):
    """Yield the `key` field of each JSON line of `path` (gzip-compressed when it ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[key]
