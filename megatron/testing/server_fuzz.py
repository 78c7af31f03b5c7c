"""Malformed-request fuzzing of the inference server, over raw sockets (so that headers can be wrong too).

Each case is a realistic mutation of a valid request: wrong types, huge / negative / non-finite numbers,
unknown or missing fields, broken JSON, deep nesting, text no tokenizer takes, conflicting fields, bad
headers (``Content-Length`` missing, negative, too large, larger than the body) and wrong routes. The
cases come from a seeded generator, so a run is repeatable. After every batch a reference request must
still return the text it returned first: a server that wedged, or whose ranks drifted apart, fails.

    python -m megatron.testing.server_fuzz --url http://127.0.0.1:5000 --cases 2000 --seed 7 \
        --reference '{"prompts": ["1 2 3 4"], "tokens_to_generate": 5}' --words 1 2 3 4 5 6 7

prints the statuses per mutation class and exits 1 when a status is outside :data:`ALLOWED` or a
request hung.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["Case", "FuzzReport", "ALLOWED", "generate_cases", "exchange", "send", "fuzz", "base_bodies", "main"]

ALLOWED = frozenset({200, 400, 404, 405, 411, 413})

# Values that break naive parsers: JSON numbers Python reads as huge ints or non-finite floats, wrong
# types, and the extremes named in issue reports (5e-324, 1e30, 2^64, 1e308).
NUMBERS = [-1, -0.0, 0, 1, 2, 3, 0.5, 1.5, 7, 64, 1000, 10**6, 2**31, 2**63, 2**64, 10**20, 10**30,
           -(2**63), 1e30, 1e308, -1e308, 5e-324, -5e-324, float("nan"), float("inf"), float("-inf")]
WRONG_TYPES = [None, True, False, "", "1", "true", "nan", [], [1], [[1]], {}, {"a": 1}, 1.0, -1]
NAMES = ["prompts", "tokens_to_generate", "logprobs", "echo_prompts", "early_exit_thres", "use_early_exit",
         "exit_layers", "print_max_prob", "top_k", "top_p", "top_p_decay", "top_p_bound", "temperature", "add_BOS",
         "stop_sequences", "stop_token_ids", "prevent_newline_after_colon", "random_seed", "beam_width",
         "length_penalty", "decoding", "draft_exit_layer", "num_speculative_tokens", "method", "recompute_cap",
         "confidence", "threshold_decay", "token_pieces", "no_log", "stop_on_eol", "use_exit_temperature"]
COMPLETION_NAMES = ["prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "echo", "stream",
                    "n", "best_of", "model", "user", "frequency_penalty", "presence_penalty"]
COMBOS = [
    {"beam_width": 2, "use_early_exit": True}, {"beam_width": 3, "prevent_newline_after_colon": True},
    {"beam_width": 3, "length_penalty": -1e308}, {"beam_width": 10**30}, {"beam_width": 100000},
    {"beam_width": 2, "decoding": "speculative"}, {"beam_width": 2, "tokens_to_generate": 0},
    {"top_k": 5, "top_p": 0.5}, {"top_p_decay": 0.5}, {"top_p": 0.5, "top_p_bound": 0.9},
    {"decoding": "full", "use_early_exit": True}, {"draft_exit_layer": 1}, {"num_speculative_tokens": 4},
    {"decoding": "speculative", "draft_exit_layer": 4}, {"decoding": "speculative", "draft_exit_layer": 2},
    {"decoding": "speculative", "num_speculative_tokens": 65}, {"method": "pipeline"},
    {"use_early_exit": True, "early_exit_thres": 0, "recompute_cap": 10**20},
    {"confidence": "margin"}, {"use_early_exit": True, "threshold_decay": 1e308}, {"exit_layers": [0]},
    {"exit_layers": [2]}, {"exit_layers": [10**30]}, {"stop_token_ids": [100000000000000000000]},
    {"stop_token_ids": [-1]}, {"stop_token_ids": [51]}, {"random_seed": 2**64}, {"random_seed": -1},
    {"temperature": 5e-324}, {"temperature": 1e-300, "top_k": 2}, {"tokens_to_generate": 10**9},
    {"tokens_to_generate": 63}, {"prompts": ["1"] * 129}, {"prompts": []}, {"add_BOS": True, "prompts": [""]},
    {"prevent_newline_after_colon": True, "tokens_to_generate": 2}, {"max_len": 5}, {"sentences": ["1"]},
]
TEXTS = ["\ud800", "\udfff tail", "a b c", "1 2 x", "1" * 100_000, "   ", "\t\n", "", "\x00", "1\x002",
         "99999999", "-5", "1.5", "\u00e9\u4e2d\U0001F600", "1 " * 3000]


@dataclass
class Case:
    """One request as bytes on the wire. ``close_write``: half-close after sending (the server sees
    the end of the body at once instead of waiting for its read deadline)."""

    kind: str
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    close_write: bool = True

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: fuzz"] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


@dataclass
class FuzzReport:
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count
    bad: list[tuple[str, object, str]] = field(default_factory=list)  # (kind, status or "hang", request head)
    drift: list[tuple[int, object]] = field(default_factory=list)  # (batch, reference answer) when it changed
    cases: int = 0

    def by_status(self) -> Counter:
        out = Counter()
        for (_, status), n in self.statuses.items():
            out[status] += n
        return out


def _dumps(body) -> bytes:
    # allow_nan: JSON's NaN / Infinity extensions are what a sloppy client sends
    return json.dumps(body, allow_nan=True).encode()


def _json_case(kind: str, body, path: str = "/api", method: str = "PUT") -> Case:
    raw = body if isinstance(body, bytes) else _dumps(body)
    return Case(kind, method, path, [("Content-Type", "application/json"), ("Content-Length", str(len(raw)))], raw)


def _mutate_fields(rng: random.Random, base: dict, names: list[str]) -> tuple[str, dict]:
    body = json.loads(json.dumps(base))
    kind = rng.choice(["type", "number", "unknown_field", "drop_field", "string", "combo"])
    name = rng.choice(names)
    if kind == "type":
        body[name] = rng.choice(WRONG_TYPES)
    elif kind == "number":
        body[name] = rng.choice(NUMBERS) if rng.random() < 0.7 else [rng.choice(NUMBERS)]
    elif kind == "unknown_field":
        typo = name[:-1] if rng.random() < 0.5 else name + "s"
        body[rng.choice([typo, "x" * rng.randint(1, 300), "__proto__", ""])] = rng.choice(NUMBERS + WRONG_TYPES)
    elif kind == "drop_field":
        body.pop(rng.choice(sorted(body)), None)
    elif kind == "string":
        target = rng.choice([k for k in ("prompts", "prompt", "stop_sequences", "stop") if k in names])
        text = rng.choice(TEXTS)
        body[target] = [text] if rng.random() < 0.7 else text
    else:
        body.update(rng.choice(COMBOS))
    return kind, body


def _broken_json(rng: random.Random, raw: bytes) -> bytes:
    cut = rng.randrange(len(raw))
    return rng.choice([
        raw[:cut], raw[:cut] + b"\xff\xfe" + raw[cut:], raw + b"}", raw + b" trailing", raw.replace(b'"', b"'", 1),
        b"", b"null", b"[]", b"1e999999", b"\xef\xbb\xbf" + raw, raw.replace(b":", b"", 1), b"{" * 10 + raw,
        b'{"prompts": ["1"], "prompts": 5}', b"1" * 5000, raw[:cut] + b"/* comment */" + raw[cut:],
    ])


def _nested(rng: random.Random, base: dict) -> bytes:
    depth = rng.choice([40, 900, 1000, 5000, 50_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    if rng.random() < 0.5:
        return inner
    field_name = rng.choice(sorted(base)).encode()
    return b'{"' + field_name + b'": ' + inner + b"}"


def _header_case(rng: random.Random, raw: bytes, path: str, method: str) -> Case:
    n = len(raw)
    variant = rng.choice(["missing", "negative", "text", "longer", "shorter", "huge", "chunked", "twice", "plus",
                          "hex", "spaces"])
    headers = [("Content-Type", "application/json")]
    body = raw
    if variant == "missing":
        pass
    elif variant == "negative":
        headers.append(("Content-Length", str(-rng.randint(1, 10))))
    elif variant == "text":
        headers.append(("Content-Length", rng.choice(["abc", "", "1.5", "NaN", "٣"])))
    elif variant == "longer":
        headers.append(("Content-Length", str(n + rng.randint(1, 1000))))
    elif variant == "shorter":
        headers.append(("Content-Length", str(max(n - rng.randint(1, 5), 0))))
    elif variant == "huge":
        headers.append(("Content-Length", str(rng.choice([10**9, 2**63, 10**30]))))
    elif variant == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = f"{n:x}\r\n".encode() + raw + b"\r\n0\r\n\r\n"
    elif variant == "twice":
        headers += [("Content-Length", str(n)), ("Content-Length", str(n + 1))]
    elif variant == "plus":
        headers.append(("Content-Length", f"+{n}"))
    elif variant == "hex":
        headers.append(("Content-Length", hex(n)))
    else:
        headers.append(("Content-Length", f" {n} "))
    return Case("header", method, path, headers, body)


def _route_case(rng: random.Random, raw: bytes) -> Case:
    method, path = rng.choice([("GET", "/api"), ("DELETE", "/api"), ("POST", "/api"), ("PATCH", "/api"),
                               ("OPTIONS", "/api"), ("PUT", "/v1/completions"), ("PUT", "/nope"), ("GET", "/nope"),
                               ("GET", "/static/../server.py"), ("GET", "/static/x.exe"), ("BREW", "/api"),
                               ("PUT", "/api?x=1"), ("GET", "/health?verbose=1"), ("GET", "/" + "a" * 3000)])
    return Case("route", method, path, [("Content-Length", str(len(raw)))], raw)


def generate_cases(seed: int, count: int, api_bodies: list[dict], completion_bodies: list[dict]) -> list[Case]:
    """``count`` malformed (or, by chance, valid) requests mutated from the given valid bodies."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        completions = completion_bodies and rng.random() < 0.3
        base = rng.choice(completion_bodies if completions else api_bodies)
        path, names = ("/v1/completions", COMPLETION_NAMES) if completions else ("/api", NAMES)
        method = "POST" if completions else "PUT"
        roll = rng.random()
        if roll < 0.6:
            kind, body = _mutate_fields(rng, base, names)
            cases.append(_json_case(kind, body, path, method))
        elif roll < 0.72:
            cases.append(_json_case("json", _broken_json(rng, _dumps(base)), path, method))
        elif roll < 0.8:
            cases.append(_json_case("nesting", _nested(rng, base), path, method))
        elif roll < 0.93:
            cases.append(_header_case(rng, _dumps(base), path, method))
        else:
            cases.append(_route_case(rng, _dumps(base)))
    return cases


def exchange(url: str, case: Case, timeout: float) -> tuple[int | str, bytes]:
    """(status, body) of the whole response; status ``"hang"`` when it did not end within ``timeout``
    seconds, ``"closed"`` when the server closed the connection without a status line."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        try:
            sock.sendall(case.wire())
            if case.close_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (413) and close before the whole body is sent
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            return "hang", b""
        except OSError:
            pass  # reset after the answer: what came before it still counts
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return "closed", b""
    return int(head.split(b" ", 2)[1]), payload


def send(url: str, case: Case, timeout: float) -> int | str:
    """The response's status (see :func:`exchange`)."""
    return exchange(url, case, timeout)[0]


def reference_answer(url: str, body: dict, timeout: float):
    """(status, text) of a valid ``PUT /api``."""
    status, payload = exchange(url, _json_case("reference", body), timeout)
    return status, (json.loads(payload).get("text") if status == 200 else payload[:200])


def fuzz(url: str, cases: list[Case], reference: dict, batch: int = 50, timeout: float = 30.0) -> FuzzReport:
    """Send ``cases`` in batches; after each batch the reference request must give its first answer.
    Stops at the first hang (the server is wedged: nothing after it would say more)."""
    report = FuzzReport()
    first = reference_answer(url, reference, timeout)
    for start in range(0, len(cases), batch):
        for case in cases[start:start + batch]:
            status = send(url, case, timeout)
            report.cases += 1
            report.statuses[(case.kind, status)] += 1
            if status not in ALLOWED:
                report.bad.append((case.kind, status, case.wire()[:300].decode("latin-1")))
            if status == "hang":
                return report
        again = reference_answer(url, reference, timeout)
        if again != first:
            report.drift.append((start // batch, again))
            return report
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="The server's base URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds without an answer that count as a hang.")
    parser.add_argument("--reference", default='{"prompts": ["1 2 3 4"], "tokens_to_generate": 5}',
                        help="A valid PUT /api body (JSON) whose answer must never change.")
    parser.add_argument("--words", nargs="+", default=["1", "2", "3", "4", "5"],
                        help="Words the model's tokenizer accepts, to build valid prompts from.")
    args = parser.parse_args(argv)
    api, completions = base_bodies(args.words)
    start = time.perf_counter()
    report = fuzz(args.url, generate_cases(args.seed, args.cases, api, completions), json.loads(args.reference),
                  args.batch, args.timeout)
    print(f"{report.cases} cases in {time.perf_counter() - start:.1f}s; statuses: {dict(sorted(report.by_status().items(), key=str))}")
    for kind in sorted({k for k, _ in report.statuses}):
        counts = {s: n for (k, s), n in sorted(report.statuses.items(), key=str) if k == kind}
        print(f"  {kind:14s} {counts}")
    for kind, status, head in report.bad[:20]:
        print(f"OUTSIDE {sorted(ALLOWED)}: {status} ({kind}): {head[:200]!r}")
    for batch_no, answer in report.drift:
        print(f"the reference answer changed after batch {batch_no}: {answer!r}")
    return 1 if report.bad or report.drift else 0


def base_bodies(words: list[str]) -> tuple[list[dict], list[dict]]:
    """Valid ``PUT /api`` and ``POST /v1/completions`` bodies built from ``words`` (short generations, so
    that a fuzz run spends its time on the server's checks, not on decoding)."""
    prompt = " ".join(words[:4])
    api = [{"prompts": [prompt], "tokens_to_generate": 2},
           {"prompts": [prompt, " ".join(words[1:3])], "tokens_to_generate": 3, "logprobs": True, "temperature": 0.7,
            "top_k": 3, "random_seed": 5},
           {"prompts": [prompt], "tokens_to_generate": 2, "use_early_exit": True, "early_exit_thres": 0.5},
           {"prompts": [prompt], "tokens_to_generate": 2, "beam_width": 2, "length_penalty": 1.0},
           {"prompts": [prompt], "tokens_to_generate": 3, "decoding": "speculative", "num_speculative_tokens": 2},
           {"prompts": [prompt], "tokens_to_generate": 0}]
    completions = [{"prompt": prompt, "max_tokens": 2, "temperature": 0},
                   {"prompt": [prompt], "max_tokens": 2, "stream": True, "logprobs": 1, "seed": 3}]
    return api, completions


if __name__ == "__main__":
    sys.exit(main())
