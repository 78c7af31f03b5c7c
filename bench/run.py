#!/usr/bin/env python
"""Run the benchmarks: ``python bench/run.py [--quick] [--only NAME ...] [--out DIR]``.

Each benchmark is ``bench/bench_<name>.py`` exposing ``main(argv) -> dict`` (the result convention is in
``bench/common.py``). For each one this writes ``<out>/<name>.json`` (the result plus the machine, the
command and the date), then ``<out>/summary.md`` with every table, and prints the summary. A benchmark
whose file is absent is reported as skipped; one that fails is reported with its error, the others still
run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import command_line, machine_info, render_markdown  # noqa: E402

__all__ = ["BENCHMARKS", "main", "run_one"]

# The suite's benchmarks in running order (reported as skipped when their file is absent), then any other
# bench_<name>.py following the convention.
_SUITE = ("training", "schedules", "data", "inference", "speculative")
BENCHMARKS = _SUITE + tuple(sorted(
    name for name in (f[len("bench_"):-len(".py")] for f in os.listdir(os.path.join(ROOT, "bench"))
                      if f.startswith("bench_") and f.endswith(".py"))
    if name not in _SUITE))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, seconds per benchmark")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the JSON results, summary.md and pictures")
    args = p.parse_args(argv)
    unknown = [n for n in args.only or () if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def run_one(name: str, quick: bool, out: str) -> dict:
    """Run ``bench/bench_<name>.py``'s ``main``; a missing file gives a skipped result, a failure an error."""
    module = f"bench.bench_{name}"
    if importlib.util.find_spec(module) is None:
        return {"name": name, "title": name, "skipped": f"bench/bench_{name}.py is not in this checkout", "tables": []}
    t0, load = time.perf_counter(), os.getloadavg()[0]
    try:
        result = importlib.import_module(module).main((["--quick"] if quick else []) + ["--out", out])
    except Exception as e:  # report, keep running the others
        traceback.print_exc()
        return {"name": name, "title": name, "error": f"{type(e).__name__}: {e}", "tables": []}
    result.setdefault("name", name)
    result["seconds"] = time.perf_counter() - t0
    # Other processes on the machine slow every runner: the load says how quiet the run was.
    result["load_average"] = [load, os.getloadavg()[0]]
    return result


def _header(machine: dict, command: str, date: str, quick: bool) -> str:
    lines = [
        "# Benchmark results" + (" (quick smoke run: sizes too small to mean anything)" if quick else ""),
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- machine: {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, "
        f"{machine['torch_threads']} torch threads in the main process, Python {machine['python']}"
        + (f", GPU {machine['cuda']}" if machine.get("cuda") else ", no GPU"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    machine = machine_info()
    command = command_line()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections, failed = [_header(machine, command, date, args.quick)], False
    for name in args.only or BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        result = run_one(name, args.quick, args.out)
        result.update(machine=machine, command=command, date=date)
        if "error" in result:
            failed = True
            result["skipped"] = f"failed: {result['error']}"
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        sections.append(render_markdown(result))
        print(sections[-1], flush=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(sections))
    print(f"wrote {os.path.join(args.out, 'summary.md')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
