"""`--tokenizer-type NullTokenizer`: text is already token ids, written as whitespace-separated integers.

As in Megatron, `--vocab-size N` gives ids 0..N-1 plus eod = N, so `vocab_size` is N + 1. Used for
synthetic/mock data and for token streams produced elsewhere.
"""

import numbers

from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError


class NullTokenizer(AbstractTokenizer):
    name = "NullTokenizer"

    def __init__(self, vocab_size) -> None:
        super().__init__()
        if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise TokenizerArgumentError(
                f"--vocab-size must be a positive integer for NullTokenizer, got {vocab_size!r}")
        self._eod = self._eos = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError as err:
            raise ValueError(f"NullTokenizer reads whitespace-separated integer ids; {err}") from err
        bad = [i for i in ids if not 0 <= i <= self._eod]
        if bad:
            raise ValueError(f"NullTokenizer ids must lie in [0, {self._eod}] (--vocab-size {self._eod} plus eod); "
                             f"got {bad[:5]}")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1
