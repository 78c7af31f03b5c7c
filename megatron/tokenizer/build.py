"""Building a tokenizer from `--tokenizer-type` and its flags, and registering those flags on a parser.

`build_tokenizer` checks that the flags the chosen type needs are present (errors name the flag), builds
the tokenizer and sets its `padded_vocab_size` (Megatron's rule, see base.padded_vocab_size).
"""

import argparse

from megatron.tokenizer import base
from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError
from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.tokenizer.huggingface import HuggingFaceTokenizer
from megatron.tokenizer.null import NullTokenizer
from megatron.tokenizer.sentencepiece_tokenizers import Llama2Tokenizer, SentencePieceTokenizer

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer",
                   "NullTokenizer")


def _construct(tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size, vocab_extra_ids):
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerArgumentError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer(tokenizer_type: str, *, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size: int | None = None, make_vocab_size_divisible_by: int = 128, tp: int = 1,
                    padded_vocab_size: int | None = None, vocab_extra_ids: int = 0) -> AbstractTokenizer:
    """Build the `--tokenizer-type` tokenizer; its padded_vocab_size suits tensor-parallel size `tp`."""
    tokenizer = _construct(tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size, vocab_extra_ids)
    tokenizer.padded_vocab_size = base.padded_vocab_size(
        tokenizer.vocab_size, make_vocab_size_divisible_by, tp, padded_vocab_size)
    return tokenizer


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register Megatron's tokenizer flags (same names and defaults) on `parser`."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=TOKENIZER_TYPES,
                       help="What type of tokenizer to use.")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 BPE vocabulary (encoder JSON).")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges file.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece model, or tokenizer.json / HF directory for HuggingFaceTokenizer.")
    group.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size for NullTokenizer.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="Pad the vocabulary to a multiple of this value times the tensor-parallel size.")
    group.add_argument("--padded-vocab-size", type=int, default=None,
                       help="Use exactly this many embedding rows instead of the padding rule.")
    group.add_argument("--vocab-extra-ids", type=int, default=0,
                       help="Number of <extra_id_i> tokens appended to a SentencePieceTokenizer.")
    return parser


def build_tokenizer_from_args(args: argparse.Namespace, tp: int = 1) -> AbstractTokenizer:
    """build_tokenizer with the values of the flags registered by add_tokenizer_args."""
    if getattr(args, "tokenizer_type", None) is None:
        raise TokenizerArgumentError(f"--tokenizer-type is required; choose one of {', '.join(TOKENIZER_TYPES)}")
    return build_tokenizer(
        args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, tp=tp,
        padded_vocab_size=args.padded_vocab_size, vocab_extra_ids=args.vocab_extra_ids)
