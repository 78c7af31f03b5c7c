"""Talk to a running text-generation server: an interactive prompt loop, or one answer per
``--prompt`` when given (non-interactive, e.g. in scripts).

    python tools/text_generation_cli.py --url http://localhost:5000/api --tokens 64 --use-early-exit --threshold 0.9
    python tools/text_generation_cli.py --prompt "Hello" --prompt "Goodbye"
    python tools/text_generation_cli.py --use-early-exit --threshold 0.3 --confidence entropy --threshold-decay 4
    python tools/text_generation_cli.py --decoding speculative --draft-exit-layer 6 --stats
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli_errors import run_cli  # noqa: E402
from tools.request_client import (  # noqa: E402
    ServerError, add_request_flags, describe_exits, early_exit_fields, parse_request_flags, put_api,
)


def parse(argv=None) -> argparse.Namespace:
    parser = add_request_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), tokens=64)
    parser.add_argument("--prompt", action="append", default=None, help="Answer this prompt and exit (repeatable).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stop", action="append", default=[], help="Stop sequence (repeatable).")
    parser.add_argument("--stats", action="store_true",
                        help="Also print the exit share, tokens/s and the speculative acceptance rate.")
    return parse_request_flags(parser, argv)


def answer(prompt: str, args: argparse.Namespace) -> str:
    body = {"prompts": [prompt], "tokens_to_generate": args.tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "random_seed": args.seed, "stop_sequences": args.stop,
            **early_exit_fields(args)}
    response = put_api(args.url, body)
    text = response["text"][0]
    return f"{text}\n[{describe_exits(response)}]" if args.stats else text


def interactive(args: argparse.Namespace) -> int:
    print("Enter a prompt (an empty line or Ctrl-D quits).")
    while True:
        try:
            prompt = input("prompt> ")
        except EOFError:
            return 0
        if not prompt:
            return 0
        try:
            print(answer(prompt, args))
        except (ServerError, urllib.error.URLError) as e:
            print(f"error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse(argv)
    if args.prompt is None:
        return interactive(args)
    try:
        for prompt in args.prompt:
            print(answer(prompt, args))
    except (ServerError, urllib.error.URLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
