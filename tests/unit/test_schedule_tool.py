"""tools/show_schedule.py: flags map to the right schedule, ASCII output, PNG, clear errors."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "show_schedule.py"
spec = importlib.util.spec_from_file_location("show_schedule", TOOL)
show = importlib.util.module_from_spec(spec)
spec.loader.exec_module(show)


def test_layer_flags_map_exits_to_positions():
    args = show.parse_args(["--pipeline-model-parallel-size", "4", "--num-layers", "16",
                            "--num-layers-per-virtual-pipeline-stage", "2", "--exit-layer-nums", "3", "11"])
    assert show.layout(args) == (2, 2, [1, 5])  # layer 11 is in chunk 1 of stage 1 (position 5)
    schedule, _, baseline = show.build(args)
    assert schedule.header.name == "interleaved_1f1b" and schedule.header.exit_positions == (1, 5)
    assert baseline is None


def test_fill_prints_grid_and_comparison(capsys):
    rc = show.main(["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--exit-layer-nums", "2", "4",
                    "--fill-explicit-bubbles", "--num-microbatches", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert sum(line.startswith("stage ") for line in out.splitlines()) == 4
    assert "warm-up fills (mb, deepest stage): (8, 1), (9, 0)" in out
    assert "makespan: 66  bubble fraction: 0.0985" in out
    assert "plain 1F1B for comparison: makespan 66  bubble fraction 0.2727" in out


def test_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tune.png"
    rc = show.main(["--pipeline-model-parallel-size", "2", "--exit-layer-nums", "1", "--tune-exit",
                    "--num-microbatches", "3", "--output", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--pipeline-model-parallel-size", "4", "--num-layers", "6"], "--num-layers (6) must be a positive multiple"),
    (["--num-layers", "8", "--exit-layer-nums", "9"], "--exit-layer-nums [9] outside 1..8"),
    (["--num-layers", "16", "--num-layers-per-virtual-pipeline-stage", "2", "--fill-explicit-bubbles",
      "--exit-layer-nums", "2"], "need no virtual pipeline"),
    (["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "3"], "must divide the layers per stage"),
    (["--pipeline-model-parallel-size", "1", "--fill-explicit-bubbles", "--exit-layer-nums", "1"],
     "needs --pipeline-model-parallel-size > 1"),
])
def test_bad_flags_give_clear_errors(argv, message, capsys):
    assert show.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    ["--fill-explicit-bubbles", "--num-fill-cooldown-microbatches", "1"], ["--tune-exit"], ["--forward-only"], [],
    ["--num-layers-per-virtual-pipeline-stage", "1"],
], ids=["fill", "tune", "forward-only", "1f1b", "interleaved"])
def test_the_tool_chooses_its_schedule_where_training_does(flags, monkeypatch):
    """The tool draws what a training run with the same flags executes: the schedule comes from
    training/forward_backward.py's build_schedule, with the training run's exit positions."""
    from megatron.model import partition
    from megatron.training import forward_backward

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return forward_backward.build_schedule(*args, **kwargs)

    monkeypatch.setattr(show, "build_schedule", spy)
    args = show.parse_args(["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--exit-layer-nums", "2",
                            "4", "--num-microbatches", "8", *flags])
    schedule, costs, _ = show.build(args)
    vpp = show.layout(args)[0]
    positions = partition(8, 4, vpp, [2, 4]).exit_positions  # what a training run passes
    assert calls and calls[0][:4] == (4, vpp, 8, positions)
    training = forward_backward.build_schedule(4, vpp, 8, positions, calls[0][4], evaluation=args.forward_only,
                                               costs=costs)
    assert schedule == training
