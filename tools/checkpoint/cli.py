"""Command-line plumbing shared by ``util.py`` and ``checkpoint_converter.py``: common flags, the save step
(args for the new files, tokenizer files beside them) and the error exit."""

from __future__ import annotations

import argparse
import logging
import os

from megatron import cli_errors
from megatron.config import ConfigError

from .megatron_io import Layout, ModelCheckpoint, build_args, update_args, write_megatron

__all__ = ["add_io_args", "positive_int", "check_save_dir", "save_megatron", "run_cli", "TOKENIZER_DIR"]

# Tokenizer files rebuilt from a GGUF file go here, inside the saved checkpoint directory.
TOKENIZER_DIR = "tokenizer"


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a size flag: an integer >= 1 (argparse names the flag in its error)."""
    return _int_at_least(text, 1, "a positive integer")


def _iteration(text: str) -> int:
    return _int_at_least(text, 0, "an iteration >= 0 (0: the tracker's)")


def add_io_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-dir", required=True, help="Directory (or GGUF file) to read.")
    parser.add_argument("--save-dir", required=True, help="Directory to write (must not hold the same iteration).")
    parser.add_argument("--load-iteration", type=_iteration, default=0,
                        help="Iteration of a Megatron checkpoint to read; 0: latest_checkpointed_iteration.txt.")
    parser.add_argument("--megatron-path", default=None, help="Accepted for EE-LLM scripts; not needed here.")


def check_save_dir(save_dir: str) -> None:
    """Refuse a ``--save-dir`` that cannot become a directory, before any work (its nearest existing
    ancestor must be a directory)."""
    path = os.path.abspath(save_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(save_dir) else f"lies under {path}, which is a file"
        raise ConfigError(f"--save-dir {save_dir} {what}, not a directory; choose a directory to write to")


def save_megatron(save_dir: str, ckpt: ModelCheckpoint, layout: Layout) -> None:
    """Write ``ckpt`` in Megatron's layout with args describing it (the source's args updated, or a complete
    default Namespace for HF / GGUF sources) and its tokenizer files under ``<save_dir>/tokenizer``."""
    tokenizer = dict(ckpt.tokenizer)
    if ckpt.tokenizer_files:
        directory = os.path.join(os.path.abspath(save_dir), TOKENIZER_DIR)
        os.makedirs(directory, exist_ok=True)
        for name, text in ckpt.tokenizer_files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        tokenizer["tokenizer_model"] = directory
    if ckpt.args is not None:
        args = update_args(ckpt.args, ckpt.model, ckpt.ee, layout, tokenizer)
    else:
        args = build_args(ckpt.model, ckpt.ee, layout, tokenizer)
    write_megatron(save_dir, ckpt, layout, args)


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)`` with progress messages on; errors as every entry point reports them
    (:func:`megatron.cli_errors.run_cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli_errors.run_cli(main, argv)
