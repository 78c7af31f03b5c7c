"""Smoke tests of the benchmark suite: each benchmark runs in --quick mode through bench/run.py and writes
valid JSON and a markdown summary. Timings are never asserted; only structure and invariants that hold
whatever the machine (same token ids, bubble filling never lengthens the step, positive memory)."""

import json

import pytest

from bench import run
from bench.common import render_markdown, table


def run_quick(name, tmp_path):
    assert run.main(["--quick", "--only", name, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())
    summary = (tmp_path / "summary.md").read_text()
    assert result["name"] == name and result["quick"] is True
    assert result["machine"]["cores"] >= 1 and result["command"] and result["date"]
    for t in result["tables"]:
        assert t["rows"] and all(len(r) == len(t["columns"]) for r in t["rows"])
        assert f"### {t['title']}" in summary
    return result


def test_training_quick(tmp_path):
    r = run_quick("training", tmp_path)
    got = {(x["pp"], x["runner"]): x for x in r["runs"]}
    assert set(got) == {(1, "plain PyTorch"), (1, "ours"), (1, "ours, 2 exits"),
                        (2, "ours"), (2, "ours, 2 exits"), (2, "torch Schedule1F1B")}
    for x in got.values():
        assert x["tokens_per_s"] > 0 and x["cpu_step_s"] > 0 and len(x["steps_s"]) == len(x["cpu_steps_s"]) == 2
        assert len(x["peak_mib"]) == x["pp"] and all(p > 0 for p in x["peak_mib"])
    assert got[(1, "ours, 2 exits")]["exits"] == [1, 3] and got[(1, "ours")]["exits"] == []
    for m in r["freed_outputs"]:  # kept against freed sent outputs, per stage
        assert len(m["kept_mib"]) == len(m["freed_mib"]) == m["pp"] and all(x > 0 for x in m["kept_mib"])


def test_schedules_quick(tmp_path):
    r = run_quick("schedules", tmp_path)
    assert [c["model"] for c in r["costs"]] == ["1.3B", "7B"]
    for sim in r["simulations"]:
        plain, ee, fill = sim["runs"]
        assert 0 < plain["bubble_fraction"] < 1 and 0 < ee["bubble_fraction"] < 1
        assert fill["makespan_units"] <= ee["makespan_units"] + 1e-9  # the planner's guarantee
        assert fill["bubble_fraction"] <= ee["bubble_fraction"] + 1e-9
    assert len(r["pictures"]) == 3  # a quick run draws the first model's schedules
    for name in r["pictures"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_quick(tmp_path):
    r = run_quick("data", tmp_path)
    assert r["documents"] == 4 and len(r["runs"]) == 4
    assert all(x["ids_equal_reference"] and x["tokens"] > 0 for x in r["runs"].values())


def test_runner_reports_missing_and_rejects_unknown(tmp_path, capsys):
    missing = run.run_one("no_such_benchmark", True, str(tmp_path))
    assert "skipped" in missing and "bench/bench_no_such_benchmark.py" in missing["skipped"]
    assert "Skipped:" in render_markdown(missing)
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="has 1 cells for 2 columns"):
        table("t", ["a", "b"], [["x"]])


def test_speculative_quick(tmp_path):
    r = run_quick("speculative", tmp_path)
    assert all(row[-1] == "yes" for row in r["tables"][0]["rows"])  # speculative output equals full depth
