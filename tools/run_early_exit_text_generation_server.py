"""Serve an early-exit GPT checkpoint over HTTP (EE-LLM's ``PUT /api``, OpenAI's ``POST /v1/completions``,
``GET /health``). Launch with torchrun and exactly tp x pp processes, e.g.::

    torchrun --nproc_per_node 4 tools/run_early_exit_text_generation_server.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --load CKPT --use-checkpoint-args --tokenizer-type SentencePieceTokenizer --tokenizer-model TOK \
        --port 5000

Global rank 0 answers HTTP; the other ranks follow its broadcast requests. Open ``http://HOST:PORT/`` in a
browser for the playground: a prompt box, the decoding mode (full depth, early exit, self-speculative)
and the generated tokens coloured by the exit they left at. Without ``--load`` it
refuses to start unless ``--random-weights`` is given. Start-up logic: megatron/text_generation/server_launch.py.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.config import ConfigError  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate  # noqa: E402
from megatron.text_generation.server_launch import build, model_info, serve, server_args  # noqa: E402
from megatron.tokenizer.base import TokenizerArgumentError  # noqa: E402
from megatron.training.checkpoint import CheckpointError  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (torchrun, SLURM) shuts the server down like Ctrl-C


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = server_args(argv)
        run, state, tokenizer, chunks = build(args)
    except (ConfigError, TokenizerArgumentError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)
    signal.signal(signal.SIGTERM, _interrupt)
    # generate(engine, request, stream=...): the server streams /v1/completions as tokens are decided
    serve(functools.partial(generate, engine), state, model_info(args, run, tokenizer), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
