"""tools/sweep_thresholds.py: threshold parsing, agreement, and a small sweep on a random model writing its
JSON and PNG, with threshold 0 exiting every token at the first exit and threshold 1 matching full depth."""

import json

import pytest

from tools.sweep_thresholds import agreement, main, parse_thresholds, read_prompts

from megatron.testing.evaluation import MODEL_FLAGS, write_task


def test_parse_thresholds():
    assert parse_thresholds("0.2:0.8:0.2") == [0.2, 0.4, 0.6, 0.8]
    assert parse_thresholds("0.9, 0.5,0") == [0.9, 0.5, 0.0]
    for bad, message in (("0.5:0.1:0.1", "start:stop:step"), ("0:1:0", "start:stop:step"), ("a,b", "comma"),
                         ("0.5,1.5", r"\[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            parse_thresholds(bad)


def test_agreement_counts_missing_tokens_as_different():
    assert agreement([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5
    assert agreement([[1]], [[1, 2]]) == 0.5


def test_read_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "1 2"}\n\n{"prompt": "3"}\n')
    (tmp_path / "p.txt").write_text("1 2\n3 4 5\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["1 2", "3"]
    assert read_prompts(str(tmp_path / "p.txt")) == ["1 2", "3 4 5"]
    (tmp_path / "bad.jsonl").write_text('{"question": "1"}\n')
    with pytest.raises(ValueError, match="line 1 needs a 'text'"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_sweep_writes_json_and_plot(tmp_path):
    (tmp_path / "prompts.txt").write_text("1 2 3\n7 8\n")
    out = tmp_path / "sweep"
    flags = ["--prompts", str(tmp_path / "prompts.txt"), "--thresholds", "0,0.5,1", "--tokens", "3",
             "--task", write_task(tmp_path / "mc.jsonl"), "--eval-batch-size", "2", "--output-dir", str(out)]
    assert main(flags + ["--"] + MODEL_FLAGS) == 0
    result = json.loads((out / "sweep.json").read_text())
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert result["config"]["num_layers"] == 4 and result["config"]["exit_layers"] == [1, 3]
    full, points = result["full_depth"], result["points"]
    assert [p["threshold"] for p in points] == [0.0, 0.5, 1.0]
    assert full["exit_share"] == {"4": 1.0} and full["task"]["kind"] == "choice"
    zero, one = points[0], points[-1]
    assert zero["mean_exit_layer"] == 1.0 and zero["exit_share"] == {"1": 1.0}  # every token leaves at once
    assert zero["task"]["mean_scored_exit_layer"] == 1.0
    assert one["agreement"] == 1.0 and one["task"]["acc"] == full["task"]["acc"]
    for p in points:
        assert p["tokens_per_s"] > 0 and 0.0 <= p["agreement"] <= 1.0 and p["num_generated"] > 0


def test_sweep_rejects_a_fixed_threshold(tmp_path):
    (tmp_path / "p.txt").write_text("1\n")
    with pytest.raises(ValueError, match="the sweep sets the threshold"):
        main(["--prompts", str(tmp_path / "p.txt"), "--early-exit-thres", "0.5", "--"] + MODEL_FLAGS)
