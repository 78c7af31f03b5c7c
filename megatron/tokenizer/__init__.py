"""Tokenizers selected by `--tokenizer-type` (GPT-2 BPE, SentencePiece, Llama-2, Hugging Face, null)."""

from megatron.tokenizer.base import AbstractTokenizer, TokenizerArgumentError, padded_vocab_size
from megatron.tokenizer.build import (
    TOKENIZER_TYPES,
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_args,
)
from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.tokenizer.huggingface import HuggingFaceTokenizer
from megatron.tokenizer.null import NullTokenizer
from megatron.tokenizer.sentencepiece_tokenizers import Llama2Tokenizer, SentencePieceTokenizer

__all__ = [
    "AbstractTokenizer", "TokenizerArgumentError", "padded_vocab_size", "TOKENIZER_TYPES", "add_tokenizer_args",
    "build_tokenizer", "build_tokenizer_from_args", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer",
    "Llama2Tokenizer", "SentencePieceTokenizer",
]
