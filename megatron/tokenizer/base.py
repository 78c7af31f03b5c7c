"""The tokenizer interface shared by every `--tokenizer-type`, vocabulary padding, and asset-file reading.

Every tokenizer exposes `tokenize(text) -> list[int]`, `detokenize(ids) -> str`, `vocab_size` (ids the
tokenizer can emit), `padded_vocab_size` (rows of the embedding table, set by `build_tokenizer`), and the
special ids `eod`, `bos`, `eos`, `pad`, `cls`, `sep`, `mask` (-1 where the tokenizer has none).

Asset files may be stored gzip-compressed (the bundled GPT-2 files are): a path ending in `.gz` is
decompressed on read, and a missing `X` is read from `X.gz` when that exists, so scripts can keep passing
Megatron's plain file names.
"""

import abc
import gzip
from pathlib import Path

from megatron.core.tensor_parallel.utils import pad_vocab_size


class TokenizerArgumentError(ValueError):
    """A tokenizer flag is missing, names a missing file, or names a file that cannot be parsed."""


class AbstractTokenizer(abc.ABC):
    """Base of all tokenizers; subclasses set `name` and implement the abstract members."""

    name = "abstract"
    _eod = _bos = _eos = _pad = _cls = _sep = _mask = -1
    _vocab: dict[str, int] | None = None
    _inv_vocab: dict[int, str] | None = None

    def __init__(self) -> None:
        self._padded_vocab_size: int | None = None

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``."""

    @abc.abstractmethod
    def detokenize(self, ids) -> str:
        """Text of ``ids``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit."""

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size if self._padded_vocab_size is None else self._padded_vocab_size

    @padded_vocab_size.setter
    def padded_vocab_size(self, value: int) -> None:
        self._padded_vocab_size = padded_vocab_size(self.vocab_size, padded=value)

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            raise AttributeError(f"{self.name} has no string vocabulary")
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            raise AttributeError(f"{self.name} has no string vocabulary")
        return self._inv_vocab

    # Special ids: subclasses assign the underscored attributes; -1 means the tokenizer has no such token.
    eod = property(lambda self: self._eod)
    bos = property(lambda self: self._bos)
    eos = property(lambda self: self._eos)
    pad = property(lambda self: self._pad)
    cls = property(lambda self: self._cls)
    sep = property(lambda self: self._sep)
    mask = property(lambda self: self._mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size})"


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1,
                      padded: int | None = None) -> int:
    """Rows of the (vocab-parallel) embedding: `padded` if given, else the smallest multiple of
    make_vocab_size_divisible_by * tp that is >= vocab_size (Megatron's rule, so checkpoints line up).
    The rule itself lives with the embedding (``tensor_parallel.pad_vocab_size``); errors are re-raised
    as :class:`TokenizerArgumentError`."""
    try:
        return pad_vocab_size(vocab_size, make_vocab_size_divisible_by, tp, padded)
    except ValueError as exc:
        raise TokenizerArgumentError(str(exc)) from None


def resolve_asset(path, flag: str, what: str) -> Path:
    """The file to read for `flag`: `path` itself, or `path.gz` when only the compressed copy exists."""
    if path is None or str(path) == "":
        raise TokenizerArgumentError(f"{flag} is required: pass {what}")
    p = Path(path)
    if p.is_file():
        return p
    gz = p.with_name(p.name + ".gz")
    if p.suffix != ".gz" and gz.is_file():
        return gz
    raise TokenizerArgumentError(f"{flag}: no such file {str(p)!r} (expected {what})")


def read_asset_bytes(path, flag: str, what: str) -> bytes:
    p = resolve_asset(path, flag, what)
    try:
        data = p.read_bytes()
        return gzip.decompress(data) if p.suffix == ".gz" else data
    except (OSError, EOFError) as err:
        raise TokenizerArgumentError(f"{flag}: cannot read {str(p)!r}: {err}") from err


def read_asset_text(path, flag: str, what: str) -> str:
    data = read_asset_bytes(path, flag, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerArgumentError(f"{flag}: {str(path)!r} is not UTF-8 text (expected {what})") from err
