#!/usr/bin/env python
"""One GPU check within a hard time budget (``bench/gpu_check.sh`` runs it on a fresh GPU machine):

1. ``rung``: the GPU test rung (``EE_MEGATRON_GPU_TESTS=1 python -m pytest -m gpu tests/gpu``);
2. ``train``: EE-LLM's 1.3B shape with and without exits on one GPU at the largest micro-batch that fits
   -- step time, tokens/s, MFU, peak memory (``bench/gpu_check_train.py``);
3. ``decode``: SmolLM2-135M greedy tokens/s, our full depth against Hugging Face ``generate`` on the same
   GPU, early exit and self-speculative decoding (``bench/gpu_check_decode.py``).

Every stage runs in a process of its own, killed when what is left of ``--budget-s`` runs out (or its own
cap), so a hang or an out-of-memory error in one stage neither takes the others down nor overruns the
budget; a stage cut off is reported with the reason. Writes ``<out>/gpu_check.json`` (every figure, the
machine, the command, the stages' raw results) and ``<out>/gpu_check.md`` (the tables), and prints them.

``--cpu-smoke`` runs the same stages on the CPU at tiny sizes -- the rung as a dry run
(``EE_MEGATRON_GPU_TESTS=cpu``), a 2-layer model, a tiny random Llama in place of SmolLM2 -- so the check
itself is known to run end to end without a GPU (``tests/e2e/test_gpu_check.py``). Its figures mean
nothing.

    python bench/gpu_check.py [--out bench/results/gpu_check] [--budget-s 450] [--only train decode]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import command_line, fmt, machine_info, render_markdown, table  # noqa: E402

__all__ = ["main", "STAGES", "tables"]

STAGES = ("rung", "train", "decode")
# Seconds each stage may take at most (GPU, CPU smoke); the budget's remainder caps them too.
CAPS = {"rung": (150, 420), "train": (170, 300), "decode": (170, 420)}
MIN_STAGE_S = 20  # a stage is not started with less left than this


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check"),
                   help="directory for gpu_check.json / .md and the stages' files")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ee_megatron_gpu_check"),
                   help="where the converted checkpoints are kept between runs")
    p.add_argument("--budget-s", type=float, default=450.0, help="hard limit for the whole check (seconds)")
    p.add_argument("--only", nargs="+", choices=STAGES, default=None, help="a subset of the stages")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the check, no figures")
    p.add_argument("--stage", choices=STAGES[1:], default=None, help=argparse.SUPPRESS)  # one stage, in-process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() to stop by
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


# ------------------------------------------------------------------ one stage, in its own process
def _run_stage(args) -> None:
    import torch

    if args.cpu_smoke:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("the GPU check needs CUDA (torch.cuda.is_available() is False); use --cpu-smoke on a CPU")
    if args.stage == "train":
        from bench.gpu_check_train import run

        result = run(args.cpu_smoke, time.monotonic() + args.deadline - time.time())
    else:
        from bench.gpu_check_decode import run

        result = run(args.cpu_smoke, args.work)
    Path(args.out, f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------ the driver
def _launch(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group (killed whole on timeout); (exit code or None, seconds)."""
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), time.monotonic() - start
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, time.monotonic() - start


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def _rung_result(out: Path, code: int | None) -> dict:
    xml = out / "rung.xml"
    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {**counts, "failed_tests": failed, "skip_reasons": skipped, "exit_code": code}


def _stage_command(args, stage: str, out: Path, deadline: float) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if stage == "rung":
        env["EE_MEGATRON_GPU_TESTS"] = "cpu" if args.cpu_smoke else "1"
        return [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
                f"--junit-xml={out / 'rung.xml'}"], env
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(out), "--work", args.work,
           "--deadline", str(deadline)]
    return cmd + (["--cpu-smoke"] if args.cpu_smoke else []), env


def run_stages(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    results = {}
    for stage in args.only or STAGES:
        left = deadline - time.time()
        cap = CAPS[stage][1 if args.cpu_smoke else 0]
        if left < MIN_STAGE_S:
            results[stage] = {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"}
            continue
        timeout = min(cap, left)
        (out / f"{stage}.json").unlink(missing_ok=True)
        cmd, env = _stage_command(args, stage, out, time.time() + timeout)
        print(f"== {stage} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
        code, seconds = _launch(cmd, env, timeout, out / f"{stage}.log")
        entry = {"seconds": seconds, "exit_code": code, "log": str(out / f"{stage}.log")}
        if stage == "rung":
            entry.update(_rung_result(out, code))
            ok = code == 0
        else:
            path = out / f"{stage}.json"
            entry["result"] = json.loads(path.read_text()) if path.exists() else None
            ok = code == 0 and entry["result"] is not None and "error" not in entry["result"]
        entry["status"] = "ok" if ok else ("timed out" if code is None else "failed")
        if not ok:
            entry["log_tail"] = _tail(out / f"{stage}.log")
        results[stage] = entry
    return results


# ------------------------------------------------------------------ tables
def _train_table(entry: dict) -> dict | None:
    r = entry.get("result") or {}
    if not r.get("configs"):
        return None
    rows = []
    for c in r["configs"]:
        rows.append(["exits after layers 6 and 12" if c["exits"] else "no exits", c["micro_batch"], c["global_batch"],
                     f"{c['step_s'] * 1000:.0f}", fmt(c["tokens_per_s"]), fmt(c["tflops_per_s"]),
                     "-" if c["mfu"] is None else f"{c['mfu']:.1%}",
                     "-" if c["peak_memory_gib"] is None else f"{c['peak_memory_gib']:.1f}"])
    notes = [f"device {r['device']}, dense bf16 peak {r['peak_bf16_tflops']} TFLOP/s; exits cost "
             f"{r['exit_overhead']:+.1%} step time; micro-batch search {r['search']}"]
    return table("Training step, EE-LLM 1.3B shape, one GPU", ["model", "micro batch", "global batch",
                                                               "step (ms)", "tokens/s", "TFLOP/s", "MFU",
                                                               "peak memory (GiB)"], rows, notes)


def _decode_table(entry: dict) -> dict | None:
    r = entry.get("result") or {}
    if not r.get("runners"):
        return None
    rows = []
    for x in r["runners"]:
        same = "-" if "baseline" not in x else f"{x['same_tokens_prompts']}/{r['prompts']} ({x['common_prefix_share']:.0%})"
        rows.append([x["runner"], fmt(x["tokens_per_s"]), f"{x['vs_our_full_depth']:.2f}x", f"{x['vs_hf_generate']:.2f}x",
                     "-" if "avg_exit_layer" not in x else f"{x['avg_exit_layer']:.1f}",
                     "-" if "acceptance_rate" not in x else f"{x['acceptance_rate']:.0%}", same])
    notes = [f"{r['model']}; exits {r['exit_layers']} ({'tuned' if r['tuned_exits'] else 'copy-initialised, untuned'}); "
             f"{r['dtype']}, batch 1, {r['prompts']} prompts x {r['tokens_per_prompt']} greedy tokens, fastest of "
             f"{r['repeats']} repeats; same tokens = prompts equal to the baseline (shared prefix)"]
    return table("Greedy decoding, one GPU", ["runner", "tokens/s", "vs our full depth", "vs HF generate",
                                              "avg exit layer", "acceptance", "same tokens as baseline"], rows, notes)


def tables(results: dict) -> list[dict]:
    rows = []
    for stage, e in results.items():
        what = {"rung": lambda: f"{e.get('passed', 0)} passed, {e.get('failures', 0) + e.get('errors', 0)} failed, "
                                f"{e.get('skipped', 0)} skipped"}.get(stage, lambda: "")()
        rows.append([stage, e["status"], f"{e.get('seconds', 0):.0f}", what or e.get("reason", "")])
    out = [table("GPU check stages", ["stage", "status", "seconds", "summary"], rows)]
    if "train" in results:
        out.append(_train_table(results["train"]))
    if "decode" in results:
        out.append(_decode_table(results["decode"]))
    return [t for t in out if t is not None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage is not None:
        _run_stage(args)
        return 0
    start = time.time()
    results = run_stages(args)
    report = {"name": "gpu_check", "title": "GPU check" + (" (CPU smoke run: no meaningful figures)" if args.cpu_smoke else ""),
              "quick": args.cpu_smoke, "machine": machine_info(), "command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "budget_s": args.budget_s, "seconds": time.time() - start, "stages": results, "tables": tables(results)}
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = render_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['seconds']:.0f} s", file=sys.stderr)
    return 0 if all(e["status"] == "ok" for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
