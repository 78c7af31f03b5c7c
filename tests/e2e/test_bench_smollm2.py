"""The real-model decoding benchmark (``bench/bench_smollm2.py``) in --quick mode (a tiny random Llama): every
runner reports, self-speculative output equals full depth's token for token, fidelity and agreement are shares,
and without a tuned checkpoint a full run is skipped with the command that makes one. Timings are never asserted."""

import json

from bench import bench_smollm2, run


def test_quick_run_reports_every_runner(tmp_path):
    assert run.main(["--quick", "--only", "smollm2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "smollm2.json").read_text())
    modes = [x["mode"] for x in r["runs"]]
    assert modes[0] == "full" and "early_exit" in modes and "speculative" in modes
    for x in r["runs"]:
        assert x["tokens"] > 0 and x["tokens_per_s"] > 0 and 0 <= x["fidelity"] <= 1 and 0 <= x["same_as_full"] <= 1
        if x["mode"] in ("full", "speculative"):  # lossless: the full model's greedy tokens
            assert x["fidelity"] == 1.0 and x["same_as_full"] == 1.0
    assert r["tables"][0]["rows"] and "### Decoding side by side" in (tmp_path / "summary.md").read_text()


def test_a_full_run_without_a_checkpoint_is_skipped_with_the_fix(tmp_path):
    r = bench_smollm2.main(["--load", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "skipped" in r and "examples/ee_tuning/smollm2_cpu.sh" in r["skipped"]
