"""Add exits to a Megatron checkpoint, move its exits between pre and post positions (EE-LLM's flags), or
fill its exits' reduced vocabulary from data (``--conversion-type exit-vocab``, ours: ``exit_vocab.py``).

The checkpoint is read whole (every rank file, its layout from the stored args), edited as one FULL
state dict (``exits.py``: seeded, tp-consistent initialisation; every exit tensor moved) and written
back with the same tp / pp / split and iteration under ``--save-dir``.

    python tools/checkpoint/checkpoint_converter.py --load-dir /ckpt/llama-2-7b --load-iteration 1 \\
        --save-dir /ckpt/llama-2-7b-8exits --add-exit-layer-nums 4 8 12 16 20 24 28 32 \\
        --use-exit-norm --use-exit-mlp

``--conversion-type exit-position`` without ``--target-exit-position`` flips the position (as EE-LLM).

    python tools/checkpoint/checkpoint_converter.py --conversion-type exit-vocab --exit-vocab-size 4096 \
        --data-path data/kjv_text_document data/code_text_document --load-dir /ckpt/tuned --save-dir /ckpt/tuned-vocab
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.config import ConfigError  # noqa: E402
from tools.checkpoint.cli import add_io_args, check_save_dir, positive_int, run_cli, save_megatron  # noqa: E402
from tools.checkpoint.exit_vocab import most_frequent, set_exit_vocab, token_counts  # noqa: E402
from tools.checkpoint.exits import AddExitRequest, add_exits, move_exits  # noqa: E402
from tools.checkpoint.megatron_io import read_megatron  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Add or move early exits of a checkpoint.", allow_abbrev=False)
    add_io_args(parser)
    parser.add_argument("--conversion-type", choices=("add-exit", "exit-position", "exit-vocab"), default="add-exit")
    parser.add_argument("--add-exit-layer-nums", type=int, nargs="+", default=[],
                        help="Layers (1-based) that get an exit; existing exits are kept.")
    parser.add_argument("--target-exit-position", choices=("pre", "post"), default=None,
                        help="add-exit: position of exits added to a model without exits (default post); "
                             "exit-position: where to move them (default: the other position).")
    parser.add_argument("--use-exit-norm", action="store_true")
    parser.add_argument("--use-exit-mlp", action="store_true")
    parser.add_argument("--use-exit-block", action="store_true")
    parser.add_argument("--random-init", action="store_true",
                        help="Random new exit tensors instead of copies of the final norm / head / last layer / MLP.")
    parser.add_argument("--init-method-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1234, help="Seed of --random-init (ours; reproducible).")
    parser.add_argument("--exit-vocab-size", type=positive_int, default=None,
                        help="exit-vocab: how many of the most frequent token ids the exits' vocabulary keeps.")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="exit-vocab: indexed datasets (.bin/.idx prefixes) whose token frequencies are counted.")
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--untie-exit-output-weights", dest="untie", action="store_true", default=None,
                     help="Each exit gets its own projection (default for a model without exits, as EE-LLM).")
    tie.add_argument("--tie-exit-output-weights", dest="untie", action="store_false",
                     help="Exits share the model's output projection (ours).")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_save_dir(args.save_dir)
    ckpt = read_megatron(args.load_dir, args.load_iteration)
    if args.conversion_type == "add-exit":
        if args.init_method_std <= 0:
            raise ConfigError(f"--init-method-std must be positive, got {args.init_method_std}")
        request = AddExitRequest(
            layers=tuple(args.add_exit_layer_nums), use_exit_norm=args.use_exit_norm, use_exit_mlp=args.use_exit_mlp,
            use_exit_block=args.use_exit_block, untie=args.untie, random_init=args.random_init,
            init_method_std=args.init_method_std, seed=args.seed, position=args.target_exit_position)
        edited = add_exits(ckpt, request)
    elif args.conversion_type == "exit-vocab":
        if args.exit_vocab_size is None or not args.data_path:
            raise ConfigError("--conversion-type exit-vocab needs --exit-vocab-size K and --data-path PREFIX [PREFIX ...]")
        counts = token_counts(args.data_path, ckpt.model.vocab_size)
        edited = set_exit_vocab(ckpt, most_frequent(counts, args.exit_vocab_size))
    else:
        position = args.target_exit_position or ("post" if ckpt.ee.pre_exit else "pre")
        edited = move_exits(ckpt, position)
    save_megatron(args.save_dir, edited, ckpt.layout)
    print(f"wrote {args.save_dir}: exits at {edited.ee.exit_layer_nums} "
          f"({'pre' if edited.ee.pre_exit else 'post'}, tp={ckpt.layout.tp}, pp={ckpt.layout.pp})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
