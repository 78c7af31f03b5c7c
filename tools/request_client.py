"""Send EE-LLM-shaped ``PUT /api`` requests to a running server, one per prompt of a JSONL file
(objects with a ``text`` field, default tools/prompt_example.jsonl); print each request, its latency,
the generated text and where the tokens left the model. Also the HTTP helpers the CLI shares.

    python tools/request_client.py --url http://localhost:5000/api --tokens 50 \
        --use-early-exit --threshold 0.8 --exit-layers 6 12
    python tools/request_client.py --use-early-exit --threshold 0.4 --confidence margin --threshold-decay 4
    python tools/request_client.py --decoding speculative --draft-exit-layer 6 --num-speculative-tokens 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://localhost:5000/api"
DECODING_MODES = ("full", "early_exit", "speculative")  # the server's request.DECODING_MODES
CONFIDENCE_MEASURES = ("top1", "margin", "entropy", "cosine", "estimator")  # the server's confidence.MEASURES
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_example.jsonl")


class ServerError(RuntimeError):
    """The server answered with an error status; ``body`` is its JSON reason when it sent one."""

    def __init__(self, status: int, body):
        reason = body.get("error") if isinstance(body, dict) else body
        field = f" (field {body['field']!r})" if isinstance(body, dict) and body.get("field") else ""
        super().__init__(f"HTTP {status}: {reason}{field}")
        self.status, self.body = status, body


def put_api(url: str, body: dict, timeout: float = 600.0) -> dict:
    """PUT ``body`` as JSON to ``url``; the JSON answer, or :class:`ServerError`."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            raise ServerError(e.code, json.loads(raw)) from None
        except ValueError:
            raise ServerError(e.code, raw) from None


def add_request_flags(parser: argparse.ArgumentParser, tokens: int) -> argparse.ArgumentParser:
    """The flags both clients share: server URL, length and early-exit settings."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"The server's /api endpoint (default {DEFAULT_URL}).")
    parser.add_argument("--tokens", type=int, default=tokens, help="Tokens to generate per prompt.")
    parser.add_argument("--use-early-exit", action="store_true", help="Let tokens leave at the exits.")
    parser.add_argument("--threshold", type=float, default=1.0,
                        help="early_exit_thres: a token exits when its confidence (--confidence) reaches this.")
    parser.add_argument("--confidence", choices=CONFIDENCE_MEASURES, default=None,
                        help="Early exit: the confidence measure (server default top1: the top-1 probability; "
                             "margin: top-1 minus top-2; entropy: 1 - normalised entropy; cosine: CALM's "
                             "similarity of the hidden states at consecutive exits; estimator: the exit's learned "
                             "estimate that it agrees with the final head, exits tuned with --exit-estimator).")
    parser.add_argument("--estimator-floor", type=float, default=None,
                        help="Early exit: measure an exit's confidence only where its learned estimate reaches "
                             "this (in [0, 1]; exits tuned with --exit-estimator): a cheap pre-filter.")
    parser.add_argument("--threshold-decay", type=float, default=None,
                        help="Early exit: CALM's decaying threshold with this decay temperature (>= 0): "
                             "0.9 threshold + 0.1 exp(-decay t / tokens), t the generated token's index.")
    parser.add_argument("--exit-layers", type=int, nargs="*", default=[],
                        help="Only these exits may fire (default: all).")
    parser.add_argument("--print-max-prob", action="store_true",
                        help="The server logs each exit's top token and probability.")
    parser.add_argument("--decoding", choices=DECODING_MODES, default=None,
                        help="full depth, early exit (same as --use-early-exit) or self-speculative: drafts from "
                             "an exit verified by the full model (same output as full depth).")
    parser.add_argument("--draft-exit-layer", type=int, default=None,
                        help="Speculative decoding: the exit that drafts (default: the model's first exit).")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="Speculative decoding: tokens drafted per verification (server default 4).")
    return parser


def parse_request_flags(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then check that the decoding flags agree (``parser.error`` names the clash)."""
    args = parser.parse_args(argv)
    decoding = args.decoding or ("early_exit" if args.use_early_exit else "full")
    if args.use_early_exit and decoding != "early_exit":
        parser.error(f"--use-early-exit contradicts --decoding {decoding}; drop one")
    if decoding != "speculative" and (args.draft_exit_layer is not None or args.num_speculative_tokens is not None):
        parser.error("--draft-exit-layer and --num-speculative-tokens need --decoding speculative")
    if decoding != "early_exit" and (args.confidence is not None or args.threshold_decay is not None
                                     or args.estimator_floor is not None):
        parser.error("--confidence, --threshold-decay and --estimator-floor need --use-early-exit (or --decoding "
                     "early_exit)")
    if args.estimator_floor is not None and not 0 <= args.estimator_floor <= 1:
        parser.error(f"--estimator-floor must lie in [0, 1], got {args.estimator_floor}")
    if args.threshold_decay is not None and not args.threshold_decay >= 0:
        parser.error(f"--threshold-decay must be >= 0, got {args.threshold_decay}")
    args.decoding = decoding
    return args


def early_exit_fields(args: argparse.Namespace) -> dict:
    """The decoding fields of a request body (``args`` from :func:`parse_request_flags`); speculative
    decoding takes no threshold or exit list."""
    decoding = args.decoding
    if decoding != "speculative":
        fields = {"use_early_exit": decoding == "early_exit", "early_exit_thres": args.threshold,
                  "exit_layers": list(args.exit_layers), "print_max_prob": args.print_max_prob}
        if args.confidence is not None:
            fields["confidence"] = args.confidence
        if args.threshold_decay is not None:
            fields["threshold_decay"] = args.threshold_decay
        if args.estimator_floor is not None:
            fields["estimator_floor"] = args.estimator_floor
        return fields
    fields = {"decoding": "speculative"}
    if args.draft_exit_layer is not None:
        fields["draft_exit_layer"] = args.draft_exit_layer
    if args.num_speculative_tokens is not None:
        fields["num_speculative_tokens"] = args.num_speculative_tokens
    return fields


def describe_exits(response: dict) -> str:
    share = response.get("exit_share") or {}
    parts = ", ".join(f"layer {layer}: {100 * s:.0f}%" for layer, s in share.items())
    speed = response.get("tokens_per_s")
    text = f"exits [{parts}]" + (f", {speed:.1f} tokens/s" if speed is not None else "")
    spec = response.get("speculative")
    if spec:
        text += (f", speculative: {spec['accepted']}/{spec['drafted']} drafts from exit {spec['draft_exit_layer']} "
                 f"accepted ({100 * spec['acceptance_rate']:.0f}%)")
    return text


def read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'text' field")
                prompts.append(record["text"])
    return prompts


def request_body(prompt: str, args: argparse.Namespace) -> dict:
    """EE-LLM client's request: greedy (top_k 1), log-probs on, a time-based seed, no echo."""
    return {"prompts": [prompt], "tokens_to_generate": args.tokens, "top_k": 1, "logprobs": True,
            "random_seed": time.time_ns() % 16384, "echo_prompts": False, **early_exit_fields(args)}


def main(argv=None) -> int:
    parser = add_request_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), tokens=50)
    parser.add_argument("--prompt-file", default=DEFAULT_PROMPTS, help="JSONL file of {\"text\": ...} prompts.")
    args = parse_request_flags(parser, argv)
    failures = 0
    for prompt in read_prompts(args.prompt_file):
        body = request_body(prompt, args)
        print(f"request: {json.dumps(body)}")
        start = time.perf_counter()
        try:
            response = put_api(args.url, body)
        except (ServerError, urllib.error.URLError) as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        print(f"response ({time.perf_counter() - start:.3f}s, {describe_exits(response)}):")
        print(response["text"][0])
        print()
    return 1 if failures else 0


if __name__ == "__main__":
    # Imported here: as a module (the CLI's HTTP helpers) this file needs nothing beyond the standard library.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron.cli_errors import run_cli

    sys.exit(run_cli(main))
