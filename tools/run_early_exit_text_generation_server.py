"""Serve an early-exit GPT checkpoint over HTTP (EE-LLM's ``PUT /api``, OpenAI's ``POST /v1/completions``,
``GET /health``). Launch with torchrun and exactly tp x pp processes, e.g.::

    torchrun --nproc_per_node 4 tools/run_early_exit_text_generation_server.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --load CKPT --use-checkpoint-args --tokenizer-type SentencePieceTokenizer --tokenizer-model TOK \
        --port 5000

Global rank 0 answers HTTP; the other ranks follow its broadcast requests. Open ``http://HOST:PORT/`` in a
browser for the playground: a prompt box, the decoding mode (full depth, early exit, self-speculative)
and the generated tokens coloured by the exit they left at. Without ``--load`` it
refuses to start unless ``--random-weights`` is given. Start-up logic: megatron/text_generation/server_launch.py
(the model: megatron/checkpoint/model_loader.py).

Exit status: 0 after SIGTERM / Ctrl-C, 2 for bad flags, 1 when the ranks could no longer agree (a rank
lost, or stuck after a failed generation: ``/health`` said ``"failed"`` first); restart it then.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpoint import CheckpointError  # noqa: E402
from megatron.checkpoint.model_loader import load_inference_model  # noqa: E402
from megatron.cli_errors import run_cli  # noqa: E402
from megatron.config import ConfigError  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate  # noqa: E402
from megatron.text_generation.server_launch import model_info, serve, server_args, server_limits  # noqa: E402
from megatron.tokenizer.base import TokenizerArgumentError  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (torchrun, SLURM) shuts the server down like Ctrl-C


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = server_args(argv)
        run, state, tokenizer, chunks = load_inference_model(args)
    except (ConfigError, TokenizerArgumentError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)
    signal.signal(signal.SIGTERM, _interrupt)
    # generate(engine, request, stream=...): the server streams /v1/completions as tokens are decided
    return serve(functools.partial(generate, engine), state, model_info(args, run, tokenizer), args.host,
                 args.port, server_limits(args))


def _exit(code: int) -> None:
    if code == 0:
        sys.exit(0)
    # The ranks could not agree: a collective of this process may still be pending, and the interpreter's
    # clean-up would wait for it for ever (and keep the other ranks waiting for this one). Leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(run_cli(main))
