"""What every benchmark shares: the result format, the machine description, timing and peak-memory meters,
and the markdown rendering of a result.

Result convention (``bench/<name>.py`` exposes ``main(argv) -> dict``; ``bench/run.py`` writes it as
``bench/results/<name>.json`` and renders it into ``summary.md``)::

    {"name": "training", "title": "...", "quick": bool,
     "tables": [{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...], "notes": [str, ...]}],
     "notes": [str, ...],            # methods: what was measured and how
     ...                             # any raw measurements (JSON-serialisable)
    }

``main`` accepts ``--quick`` (a seconds-long smoke run) and ``--out DIR`` (where to put files such as
pictures); unknown options are an error. Tables are built with :func:`table`; every comparison in one
table is measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["table", "machine_info", "time_step", "PeakMemory", "render_markdown", "fmt", "bench_parser",
           "parse_positive", "command_line"]

MIB = 1024 * 1024


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence], notes: Sequence[str] = ()) -> dict:
    """One result table; every row has one cell per column."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table {title!r}: row {row!r} has {len(row)} cells for {len(columns)} columns")
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "notes": list(notes)}


def bench_parser(doc: str, quick_help: str, out_help: str = "unused (no files besides the result)",
                 out_default: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the convention's ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=out_default, help=out_help)
    return p


def parse_positive(p: argparse.ArgumentParser, argv: list[str] | None, *flags: str) -> argparse.Namespace:
    """Parse ``argv``; each of ``flags`` (dest names), when given, must be >= 1."""
    args = p.parse_args(argv)
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be >= 1, got {value}")
    return args


def fmt(x: float, digits: int = 3) -> str:
    """A measured number with ``digits`` significant digits, thousands separated when large."""
    if x is None:
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def machine_info() -> dict:
    """Cores, CPU model, torch version and threads: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def time_step(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one call of ``fn``. ``cpu`` is this process's CPU time (all its threads):
    unlike wall time it does not grow when other processes load the machine, but it misses time spent
    waiting (on a pipeline peer, say). ``sync`` runs before the call and before the clocks stop (a barrier,
    or waiting for queued device work)."""
    if sync is not None:
        sync()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - w0, time.process_time() - c0


class PeakMemory:
    """Peak memory above a baseline, on one device.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only).
    CPU: peak resident set size of this process (Linux ``VmHWM``) after resetting the kernel's high-water
    mark (``/proc/self/clear_refs`` = 5), minus the resident size at reset. So that freed tensors really
    leave the resident set (and a later allocation is counted again), :meth:`prepare_cpu_process` sets
    glibc's mmap threshold to 64 KiB: every tensor of 64 KiB or more gets its own mapping, returned to the
    kernel when freed. Call it once in a fresh (forked) process before anything is allocated; it changes
    allocation speed, so time in another process."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.base = 0

    @staticmethod
    def prepare_cpu_process() -> None:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>; setting it also disables glibc's dynamic threshold
        if libc.mallopt(m_mmap_threshold, 64 * 1024) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak CPU memory cannot be measured here")
        libc.malloc_trim(0)

    @staticmethod
    def release_free_memory() -> None:
        """Hand glibc's free heap back to the kernel (after dropping a warm-up run's objects)."""
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}: peak CPU memory needs Linux")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = self._status("VmRSS")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._status("VmHWM") - self.base

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at start"
        return ("peak RSS (VmHWM after clear_refs=5) above the RSS at start, in a forked process with glibc's "
                "mmap threshold at 64 KiB so freed tensors leave the RSS, after a discarded warm-up run of the "
                "same configuration (pages in library code)")


def _cell(x) -> str:
    return str(x).replace("|", "\\|")


def render_markdown(result: dict) -> str:
    """A result's tables (and notes) as markdown."""
    out = [f"## {result.get('title', result['name'])}", ""]
    if result.get("skipped"):
        out += [f"Skipped: {result['skipped']}", ""]
    if result.get("load_average"):
        before, after = result["load_average"]
        out += [f"Ran {result.get('seconds', 0):.0f} s; load average (1 min) {before:.1f} before, {after:.1f} after "
                f"({result.get('machine', {}).get('cores', '?')} cores).", ""]
    for t in result.get("tables", []):
        out += [f"### {t['title']}", "", "| " + " | ".join(_cell(c) for c in t["columns"]) + " |",
                "|" + "---|" * len(t["columns"])]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
        out.append("")
        out += [f"- {n}" for n in t.get("notes", [])]
        if t.get("notes"):
            out.append("")
    if result.get("notes"):
        out += ["Method:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(out)


def save_and_print(result: dict, path) -> None:
    """A benchmark run as a script: write its JSON result to ``path`` and print its tables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(render_markdown(result))


def command_line() -> str:
    return " ".join([os.path.basename(sys.executable)] + sys.argv)
