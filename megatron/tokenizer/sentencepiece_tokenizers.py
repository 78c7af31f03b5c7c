"""SentencePiece tokenizers: `SentencePieceTokenizer` (pre-training) and `Llama2Tokenizer` (EE-Tuning).

SentencePieceTokenizer follows Megatron: the model's pieces come first, then special tokens are appended
when the model lacks them, in this order: <CLS>, <SEP>, <EOD>, <MASK>, the model's pad piece (else <PAD>),
its bos piece (else <BOS>), its eos piece (else <EOS>), then <extra_id_0..n-1>. With Llama's 32000-piece
model this gives <EOD> = 32002 and 32005 ids. `tokenize` cuts the text at every special-token string
(earliest first; on a tie the earlier-registered token wins) and encodes the pieces between them.

Llama2Tokenizer is the plain model: 32000 ids, BOS prepended by `tokenize` unless bos=False, eod = eos.
"""

import regex

from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError, read_asset_bytes

_WHAT = "a SentencePiece model file, e.g. data/llama_sp/tokenizer.model"


def load_sentencepiece(tokenizer_model):
    """A SentencePieceProcessor for `--tokenizer-model` (plain or .gz), with flag-named errors."""
    import sentencepiece

    proto = read_asset_bytes(tokenizer_model, "--tokenizer-model", _WHAT)
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as err:
        raise TokenizerArgumentError(
            f"--tokenizer-model: {str(tokenizer_model)!r} is not a SentencePiece model ({err}); expected {_WHAT}"
        ) from err
    if sp.get_piece_size() == 0:
        raise TokenizerArgumentError(f"--tokenizer-model: {str(tokenizer_model)!r} holds no pieces")
    return sp


def _piece_or(sp, piece_id: int, fallback: str) -> str:
    return sp.id_to_piece(piece_id) if 0 <= piece_id < sp.get_piece_size() else fallback


class _SentencePieceBase(AbstractTokenizer):
    """Holds the SP processor and the piece <-> id maps; subclasses decide specials and tokenize rules."""

    def __init__(self, tokenizer_model) -> None:
        super().__init__()
        self._sp = load_sentencepiece(tokenizer_model)
        self._inv_vocab = {i: self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())}
        self._vocab = {piece: i for i, piece in self._inv_vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._inv_vocab)

    @property
    def sp(self):
        """The underlying sentencepiece.SentencePieceProcessor."""
        return self._sp


class SentencePieceTokenizer(_SentencePieceBase):
    name = "SentencePieceTokenizer"

    def __init__(self, tokenizer_model, vocab_extra_ids: int = 0) -> None:
        super().__init__(tokenizer_model)
        if vocab_extra_ids < 0:
            raise TokenizerArgumentError(f"--vocab-extra-ids must be >= 0, got {vocab_extra_ids}")
        self._special: dict[str, int] = {}
        sp = self._sp
        names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", _piece_or(sp, sp.pad_id(), "<PAD>"),
                 _piece_or(sp, sp.bos_id(), "<BOS>"), _piece_or(sp, sp.eos_id(), "<EOS>")]
        for token in names:
            self._add_special(token)
        self._cls, self._sep, self._eod, self._mask, self._pad, self._bos, self._eos = (
            self._vocab[t] for t in names)
        self._extra_ids = [self._add_special(f"<extra_id_{i}>") for i in range(vocab_extra_ids)]
        self._inv_special = {i: t for t, i in self._special.items()}
        # Alternation order = registration order, so on a tie at one position the earlier token wins.
        self._special_pattern = regex.compile("|".join(regex.escape(t) for t in self._special))

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            new_id = len(self._inv_vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids.extend(self._sp.encode(text[start:match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._sp.encode(text[start:]))
        return ids

    def detokenize(self, ids) -> str:
        # Megatron's layout: each special token is written between spaces, the runs between go through SP.
        ids = [int(i) for i in ids]
        parts, run = [], []
        for i in ids:
            if i in self._inv_special:
                parts.append(self._sp.decode(run) + " " + self._inv_special[i] + " ")
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return list(self._extra_ids)


class Llama2Tokenizer(_SentencePieceBase):
    name = "Llama2Tokenizer"

    def __init__(self, tokenizer_model) -> None:
        super().__init__(tokenizer_model)
        self._bos, self._eos, self._pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        self._eod = self._eos
        if self._bos < 0 or self._eos < 0:
            raise TokenizerArgumentError(
                f"--tokenizer-model: {str(tokenizer_model)!r} defines no bos/eos piece, which Llama2Tokenizer "
                "needs; use --tokenizer-type SentencePieceTokenizer for such a model")

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])
