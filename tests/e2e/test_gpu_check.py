"""bench/gpu_check.sh / gpu_check.py: the CPU smoke run goes through every stage end to end (the GPU rung as a
dry run, the training measurement on a 2-layer model, decoding of a tiny random Llama against transformers),
and the driver keeps to its time budget. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench.gpu_check_train import peak_bf16_tflops  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_smoke_runs_every_stage(tmp_path):
    pytest.importorskip("transformers")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, BUDGET_S="880", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert proc.returncode == 0, {k: v.get("log_tail") for k, v in stages.items()}
    assert {k: v["status"] for k, v in stages.items()} == {"rung": "ok", "train": "ok", "decode": "ok"}
    assert stages["rung"]["passed"] > 10 and stages["rung"]["failures"] == stages["rung"]["errors"] == 0
    train = stages["train"]["result"]
    assert [c["exits"] for c in train["configs"]] == [[], [2]]
    assert all(c["step_s"] > 0 and c["model_flops_per_step"] > 0 for c in train["configs"])
    runners = {r["runner"]: r for r in stages["decode"]["result"]["runners"]}
    assert runners["ours, full depth"]["same_tokens_prompts"] == 1  # our full depth = transformers' greedy
    speculative = next(r for name, r in runners.items() if name.startswith("self-speculative"))
    assert speculative["same_tokens_prompts"] == 1
    assert [t["title"] for t in report["tables"]] == ["GPU check stages", "Training step, EE-LLM 1.3B shape, one GPU",
                                                      "Greedy decoding, one GPU"]
    assert "| ours, full depth |" in (out / "gpu_check.md").read_text() and "GPU check stages" in proc.stdout


def test_no_stage_starts_once_the_budget_is_spent(tmp_path):
    args = gpu_check.parse_args(["--cpu-smoke", "--out", str(tmp_path), "--budget-s", "5"])
    results = gpu_check.run_stages(args)
    assert {k: v["status"] for k, v in results.items()} == {"rung": "skipped", "train": "skipped", "decode": "skipped"}
    assert all("time budget spent" in v["reason"] for v in results.values())
    assert [t["title"] for t in gpu_check.tables(results)] == ["GPU check stages"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])


def test_a_stage_over_its_time_is_killed_and_reported(tmp_path):
    """The driver kills a stage's whole process group at its deadline and goes on."""
    code, seconds = gpu_check._launch([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), 1.0,
                                      tmp_path / "log")
    assert code is None and seconds < 30


def test_peak_flops_by_device_name():
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Some Future GPU") is None and peak_bf16_tflops(None) is None
