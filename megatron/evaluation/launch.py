"""Command-line start-up shared by the task runner (``python -m megatron.evaluation``) and
``tools/sweep_thresholds.py``: the evaluation flags, and the model built from the usual Megatron /
EE-LLM flags by :mod:`megatron.checkpoint.model_loader`, as the text-generation server builds it
(``--load CKPT [--use-checkpoint-args]`` or ``--random-weights`` with the model-shape flags; launch tp x pp
processes with torchrun for a parallel model). A tool parses its own flags first and hands the rest to
:func:`build_model`.
"""

from __future__ import annotations

import argparse
import sys

from megatron.checkpoint.model_loader import LoadedModel, inference_args, load_inference_model
from megatron.text_generation.confidence import MEASURES

from .adapter import EarlyExitLM

__all__ = ["add_eval_args", "split_argv", "build_model", "build_lm"]


def split_argv(argv=None) -> tuple[list[str], list[str]]:
    """(the tool's own flags, the model flags): the two sides of a ``--`` (all the tool's without one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="evaluation")
    g.add_argument("--exit-layer", type=int, default=None,
                   help="Evaluate exit L (the first L layers plus its head) instead of the full model.")
    g.add_argument("--early-exit-thres", type=float, default=None,
                   help="Evaluate early exits under this confidence threshold in [0, 1].")
    g.add_argument("--confidence", default="top1", choices=MEASURES, help="Confidence measure for the threshold.")
    g.add_argument("--use-exit-temperature", action="store_true",
                   help="Divide exit logits by --exit-layer-temperature before measuring confidence.")
    g.add_argument("--eval-batch-size", type=int, default=8, help="Sequences per forward / generation batch.")
    g.add_argument("--max-gen-toks", type=int, default=32, help="Generated tokens at most per generation item.")
    return parser


def build_model(model_argv: list[str]) -> LoadedModel:
    """The model of this rank from Megatron flags (see the module doc); flags are checked as the server
    checks them (weights source, one replica of tp x pp processes, no virtual pipeline)."""
    return load_inference_model(inference_args(model_argv))


def build_lm(model: LoadedModel, ns: argparse.Namespace, *, early_exit_thres: float | None = None,
             generate_fn=None) -> EarlyExitLM:
    """An :class:`EarlyExitLM` over ``model`` with the flags of :func:`add_eval_args` (``early_exit_thres``
    overrides ``--early-exit-thres``)."""
    thres = ns.early_exit_thres if early_exit_thres is None else early_exit_thres
    return EarlyExitLM(model.chunks, model.state, model.tokenizer, model.run.model, model.run.early_exit,
                       exit_layer=ns.exit_layer, early_exit_thres=thres, confidence=ns.confidence,
                       use_temperature=ns.use_exit_temperature, batch_size=ns.eval_batch_size,
                       max_gen_toks=ns.max_gen_toks, generate_fn=generate_fn)
