"""Convert and reshard checkpoints: one loader, one saver, EE-LLM's ``tools/checkpoint/util.py`` flags.

Loaders: ``megatron`` (our and EE-LLM / Megatron checkpoint directories, every rank file, exits
included), ``llama2_hf`` / ``llama_hf`` (Llama 2 / 3, GQA; a local directory), ``gpt2_hf``, ``gguf`` (a
Llama GGUF file; its tokenizer is written to ``<save-dir>/tokenizer``). Savers: ``megatron`` at any
``--target-tensor-parallel-size`` / ``--target-pipeline-parallel-size`` / ``--target-layers-per-stage``
(resharding; every exit tensor included) and ``hf`` (see ``hf_io``: transformers' files plus the exit
heads beside them).

Iterations: an HF / GGUF import is written as iteration 1 (not ``release``), as EE-LLM's conversion does,
so its ``add_exit_layers.sh`` / tuning scripts (``--load-iteration 1``, ``--finetune``) work unchanged; a
Megatron source keeps its iteration (or ``release``). Saved files hold the model and ``args`` only (no
optimizer / RNG state, as Megatron's converter): train from them with ``--finetune``.

    python tools/checkpoint/util.py --model-type EarlyExitGPT --loader llama2_hf --saver megatron \\
        --load-dir /models/llama-2-7b-hf --save-dir /ckpt/llama-2-7b-tp1-pp4 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.config import ConfigError  # noqa: E402
from tools.checkpoint.cli import add_io_args, check_save_dir, positive_int, run_cli, save_megatron  # noqa: E402
from tools.checkpoint.megatron_io import Layout, ModelCheckpoint, read_megatron  # noqa: E402

LOADERS = ("megatron", "llama2_hf", "llama_hf", "gpt2_hf", "gguf")
SAVERS = ("megatron", "hf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert / reshard (early-exit) GPT checkpoints.",
                                     allow_abbrev=False)
    parser.add_argument("--model-type", required=True, choices=("GPT", "EarlyExitGPT"),
                        help="Both keep whatever exits the source has.")
    parser.add_argument("--loader", required=True, choices=LOADERS)
    parser.add_argument("--saver", required=True, choices=SAVERS)
    add_io_args(parser)
    parser.add_argument("--target-tensor-parallel-size", type=positive_int, default=None,
                        help="Default: the source's (1 for HF / GGUF sources).")
    parser.add_argument("--target-pipeline-parallel-size", type=positive_int, default=None,
                        help="Default: the source's (1 for HF / GGUF sources).")
    parser.add_argument("--target-layers-per-stage", type=positive_int, nargs="+", default=None,
                        help="Uneven stage split (ours); default: the source's at the same pipeline size, else even.")
    parser.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=positive_int, default=None,
                        help="Interleaved chunks (ours); default: the source's at the same pipeline size, else none.")
    parser.add_argument("--tokenizer-model", default=None,
                        help="Tokenizer to record in the saved args (a SentencePiece .model, or tokenizer.json / "
                             "an HF directory); default: the source's.")
    parser.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=1,
                        help="HF / GGUF imports: pad the vocab to a multiple of this x target tp (1: only as tp "
                             "needs, as EE-LLM's Llama loader).")
    return parser


def _target_layout(args, ckpt: ModelCheckpoint) -> Layout:
    src = ckpt.layout
    tp = args.target_tensor_parallel_size or src.tp
    pp = args.target_pipeline_parallel_size or src.pp
    same_pp = pp == src.pp
    split = args.target_layers_per_stage or (src.layers_per_stage if same_pp else None)
    per_chunk = args.target_num_layers_per_virtual_pipeline_stage
    if per_chunk is None:
        vpp = src.vpp if same_pp else 1
    else:
        counts = split or [ckpt.model.num_layers // pp]
        if any(c % per_chunk for c in counts) or len({c // per_chunk for c in counts}) != 1:
            raise ConfigError(f"--target-num-layers-per-virtual-pipeline-stage {per_chunk} must divide every stage's "
                              f"layer count {sorted(set(counts))} into the same number of chunks")
        vpp = counts[0] // per_chunk
    layout = Layout(tp, pp, vpp, tuple(split) if split else None)
    layout.partition(ckpt.model, ckpt.ee)  # refuse an impossible split before anything is written
    return layout


def load(args) -> ModelCheckpoint:
    """The source named by ``--loader`` / ``--load-dir`` as one in-memory model."""
    tp = args.target_tensor_parallel_size or 1
    if args.loader == "megatron":
        ckpt = read_megatron(args.load_dir, args.load_iteration)
        if args.tokenizer_model:
            from tools.checkpoint.hf_io import explicit_tokenizer_args

            ckpt.tokenizer = explicit_tokenizer_args(args.tokenizer_model)
        return ckpt
    if args.loader == "gguf":
        from tools.checkpoint.gguf_io import load_gguf

        return load_gguf(args.load_dir, tp=tp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    from tools.checkpoint.hf_io import load_hf

    family = "gpt2" if args.loader == "gpt2_hf" else "llama"
    return load_hf(args.load_dir, family, tp=tp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                   tokenizer_model=args.tokenizer_model)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_save_dir(args.save_dir)
    ckpt = load(args)
    if args.saver == "hf":
        from tools.checkpoint.hf_io import save_hf

        save_hf(args.save_dir, ckpt)
    else:
        save_megatron(args.save_dir, ckpt, _target_layout(args, ckpt))
    print(f"wrote {args.save_dir} ({args.loader} -> {args.saver})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
