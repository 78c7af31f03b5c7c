"""`--tokenizer-type HuggingFaceTokenizer`: a Hugging Face tokenizer loaded through the `tokenizers` package.

`--tokenizer-model` names a `tokenizer.json` file, or a local directory holding either `tokenizer.json` or
a GPT-2 style `vocab.json` + `merges.txt` pair (byte-level BPE). Nothing is downloaded. Special ids come
from the directory's `tokenizer_config.json` / `special_tokens_map.json` when present, else from the
tokenizer's added tokens with a well-known end-of-text name. As in Megatron, `tokenize` runs the
tokenizer's post-processor (which may add BOS) unless add_special_tokens=False.
"""

import json
from pathlib import Path

from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError

_WHAT = "a tokenizer.json file or a directory with tokenizer.json or vocab.json + merges.txt"
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "--tokenizer-type HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers") from err
    return tokenizers


def _load(path: Path):
    tokenizers = _import_tokenizers()
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        if file.is_file():
            return tokenizers.Tokenizer.from_file(str(file))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            model = tokenizers.models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
            tok = tokenizers.Tokenizer(model)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            return tok
    except Exception as err:  # the Rust side raises plain Exception subclasses for parse errors
        raise TokenizerArgumentError(f"--tokenizer-model: cannot load {str(path)!r} ({err}); expected {_WHAT}") \
            from err
    raise TokenizerArgumentError(f"--tokenizer-model: no tokenizer found at {str(path)!r}; expected {_WHAT}")


def _configured_specials(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings named by the HF config files (values may be str or {"content": str})."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise TokenizerArgumentError(f"--tokenizer-model: cannot parse {str(file)!r}: {err}") from err
        for key in ("bos", "eos", "pad"):
            value = config.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


class HuggingFaceTokenizer(AbstractTokenizer):
    name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model) -> None:
        super().__init__()
        if tokenizer_model is None or str(tokenizer_model) == "":
            raise TokenizerArgumentError(f"--tokenizer-model is required for HuggingFaceTokenizer: pass {_WHAT}")
        path = Path(tokenizer_model)
        self._tok = _load(path)
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        configured = _configured_specials(path if path.is_dir() else path.parent)
        self._bos = self._special_id(configured.get("bos"), _BOS_NAMES)
        self._eos = self._eod = self._special_id(configured.get("eos"), _EOS_NAMES)
        self._pad = self._special_id(configured.get("pad"), _PAD_NAMES)

    def _special_id(self, configured: str | None, names: tuple[str, ...]) -> int:
        for token in ((configured,) if configured is not None else names):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return -1

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        # Ids may have gaps (added tokens placed past the model vocabulary): the embedding must cover the largest.
        return max(self._inv_vocab) + 1

    @property
    def tokenizer(self):
        """The underlying tokenizers.Tokenizer."""
        return self._tok
