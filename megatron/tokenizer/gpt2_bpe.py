"""GPT-2 byte-level BPE (`--tokenizer-type GPT2BPETokenizer`): ids identical to OpenAI's GPT-2 encoder.

Text is split into words by GPT-2's regular expression (the `regex` package supplies \\p{L} / \\p{N}); each
word's UTF-8 bytes are mapped to printable unicode stand-ins and merged pair by pair in merge-rank order.
Corpora repeat words heavily, so word -> ids results are cached: encoding then costs one regex scan and a
dict lookup per word. `<|endoftext|>` inside the text is not treated specially (as in Megatron): documents
get their eod from the caller (`--append-eod`), never from the text.
"""

import json

import regex

from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError, read_asset_text

# GPT-2's pre-tokenizer: contractions, letter runs, number runs, other-symbol runs (each with an optional
# leading space), then whitespace that is not followed by a word (so a word keeps its one leading space).
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_CACHE_LIMIT = 500_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: printable latin-1 bytes map to themselves, the other
    68 bytes to the code points 256, 257, ... in byte order (so no BPE symbol is whitespace or control)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _load_vocab(vocab_file) -> dict[str, int]:
    what = "the GPT-2 encoder JSON (token -> id), e.g. data/gpt2/gpt2-vocab.json"
    text = read_asset_text(vocab_file, "--vocab-file", what)
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as err:
        raise TokenizerArgumentError(f"--vocab-file: {str(vocab_file)!r} is not JSON ({err}); expected {what}")
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise TokenizerArgumentError(f"--vocab-file: {str(vocab_file)!r} is not a token -> id map; expected {what}")
    return vocab


def _load_merges(merge_file) -> dict[tuple[str, str], int]:
    what = "the GPT-2 merges file (one 'left right' pair a line), e.g. data/gpt2/gpt2-merges.txt"
    ranks: dict[tuple[str, str], int] = {}
    for number, line in enumerate(read_asset_text(merge_file, "--merge-file", what).splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise TokenizerArgumentError(
                f"--merge-file: line {number} of {str(merge_file)!r} is not a 'left right' pair: {line!r}")
        ranks.setdefault((pair[0], pair[1]), len(ranks))
    if not ranks:
        raise TokenizerArgumentError(f"--merge-file: {str(merge_file)!r} holds no merges; expected {what}")
    return ranks


class GPT2BPETokenizer(AbstractTokenizer):
    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file, merge_file) -> None:
        super().__init__()
        self._vocab = _load_vocab(vocab_file)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        self._ranks = _load_merges(merge_file)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # Words arrive as str; going through latin-1 turns each UTF-8 byte into one char that translate()
        # maps to its stand-in, which is much faster than a per-byte Python loop.
        self._byte_table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        self._cache: dict[str, list[int]] = {}
        if "<|endoftext|>" not in self._vocab:
            raise TokenizerArgumentError(f"--vocab-file: {str(vocab_file)!r} has no '<|endoftext|>' token")
        self._eod = self._bos = self._eos = self._vocab["<|endoftext|>"]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_word(self, word: str) -> list[int]:
        mapped = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        ids = [self._vocab[s] for s in self._bpe(list(mapped))]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in _WORD_PATTERN.findall(text):
            hit = cache.get(word)
            ids.extend(hit if hit is not None else self._encode_word(word))
        return ids

    def detokenize(self, ids) -> str:
        text = "".join(self._inv_vocab[int(i)] for i in ids)
        return bytes(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)
