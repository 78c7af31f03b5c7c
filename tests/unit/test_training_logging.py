"""Console lines, metrics and trackers of the training loop (no processes)."""

import io
import logging
import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.run_config import LoggingConfig
from megatron.training.logging_utils import ProgressBar, format_eval_line, format_train_line, ppl
from megatron.training.metrics import IntervalStats, flops_per_iteration, loss_keys, peak_memory_mb, reduce_losses
from megatron.training.trackers import Trackers, build_trackers

LINE = dict(iteration=5, train_iters=100, consumed_samples=40, ms_per_iteration=12.34, learning_rate=3e-4,
            global_batch_size=8, losses={"lm loss": math.log(1000), "early loss [2]": 7.25},
            exit_weights={2: 0.25}, loss_scale=1.0, grad_norm=1.23456, num_zeros=None, skipped=0, nan=0,
            tokens_per_second=1234.56, tflops_per_device=0.0123, peak_memory_mb=321.0)


def test_train_line_keeps_megatron_format():
    assert format_train_line(**LINE) == (
        " iteration        5/     100 | consumed samples:           40 | elapsed time per iteration (ms): 12.3 |"
        " learning rate: 3.000E-04 | global batch size:     8 | lm loss: 6.907755E+00 | early loss [2]: 7.250000E+00 |"
        " exit weight [2]: 2.500000E-01 | loss scale: 1.0 | grad norm: 1.235 | number of skipped iterations:   0 |"
        " number of nan iterations:   0 | tokens per second: 1234.6 | TFLOP/s per device: 0.012 |"
        " peak memory (MB): 321.0 |")


def test_train_line_without_clipping_or_exits_omits_those_fields():
    line = format_train_line(**{**LINE, "grad_norm": None, "exit_weights": {}, "losses": {"lm loss": 2.0}})
    assert "grad norm" not in line and "exit weight" not in line and "early loss" not in line
    # A Megatron-style parser still finds every field it knows.
    fields = dict(re.findall(r" ([a-zA-Z/ ()]+): ([-+.\dE]+) \|", line))
    assert fields["lm loss"] == "2.000000E+00" and fields["loss scale"] == "1.0"


def test_eval_line_reports_loss_and_perplexity_of_every_exit():
    line = format_eval_line("iteration 10", {"lm loss": 2.0, "early loss [3]": 3.0})
    assert line == (" validation loss at iteration 10 | lm loss value: 2.000000E+00 | lm loss PPL: 7.389056E+00 |"
                    " early loss [3] value: 3.000000E+00 | early loss [3] PPL: 2.008554E+01 |")
    assert ppl(1e6) == math.exp(20.0)  # capped like Megatron's, never inf


def test_interval_stats_average_successful_iterations_and_count_nan():
    s = IntervalStats()
    s.add({"lm loss": 2.0}, skipped=False, elapsed=0.1)
    s.add({"lm loss": float("nan")}, skipped=True, elapsed=0.3)
    s.add({"lm loss": 4.0}, skipped=False, elapsed=0.2)
    assert s.mean_losses() == {"lm loss": 3.0}
    assert (s.iterations, s.skipped, s.nan) == (3, 1, 1)
    assert s.time_per_iteration == pytest.approx(0.2)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar(10, start=0, stream=stream, width=10)
        bar.update(5)
        bar.clear()
    assert "[#####.....] 5/10" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("arch, ee", [
    (dict(), dict(exit_layer_nums=[1], use_exit_mlp=True)),
    (dict(swiglu=True, num_query_groups=2, ffn_hidden_size=48), dict(exit_layer_nums=[1, 2], use_exit_block=True)),
])
def test_flops_match_torch_flop_counter(arch, ee):
    """The forward FLOPs equal what torch counts for the model's forward (exits, head, attention)."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                      make_vocab_size_divisible_by=16, seq_length=16, **arch)
    exits = EarlyExitConfig(**ee)
    model = EarlyExitGPTModel(cfg, exits, state=ParallelState.single())
    ids = torch.randint(0, 64, (3, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids)
    forward = counter.get_total_flops()
    assert flops_per_iteration(cfg, exits, 64, samples=3) == pytest.approx(3 * forward)
    # EE-Tuning back-propagates only through the exits: more than a forward, less than a full step.
    assert forward < flops_per_iteration(cfg, exits, 64, samples=3, tune_exit=True) < 3 * forward


def test_reduce_losses_in_one_process_keeps_reported_keys():
    ee = EarlyExitConfig(exit_layer_nums=[2, 5])
    assert loss_keys(ee) == ["lm loss", "early loss [2]", "early loss [5]"]
    got = reduce_losses({"early loss [2]": 1.5, "lm loss": 2.5}, loss_keys(ee), ParallelState.single())
    assert got == {"lm loss": 2.5, "early loss [2]": 1.5}
    assert peak_memory_mb(torch.device("cpu")) > 10


class _Recorder:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_trackers_fan_out_with_prefixes():
    a, b = _Recorder(), _Recorder()
    trackers = Trackers([a, b])
    trackers.log("train", {"lm loss": 2.0, "exit weight [2]": 0.5}, 7)
    trackers.close()
    assert a.scalars == b.scalars == [("train/lm loss", 2.0, 7), ("train/exit weight [2]", 0.5, 7)]
    assert a.closed and not trackers


def test_wandb_is_optional(caplog, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        trackers = build_trackers(LoggingConfig(wandb_project="EE-LLM"))
    assert not trackers and "wandb is not installed" in caplog.text
    assert not build_trackers(LoggingConfig(wandb_project="EE-LLM"), active=False)


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = build_trackers(LoggingConfig(tensorboard_dir=str(tmp_path)))
    trackers.log("train", {"lm loss": 2.0}, 1)
    trackers.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/lm loss")] == [(1, 2.0)]


@pytest.mark.parametrize("device, timers, syncs", [("cuda", True, 2), ("cuda", False, 0), ("cpu", True, 0)])
def test_phase_timers_wait_for_the_gpu_only_when_reported(monkeypatch, device, timers, syncs):
    """Per-phase timers (--log-timers-to-tracker) wait for the device's queued kernels before each reading
    on CUDA, so a phase is not credited with the previous phase's kernels; without timers no
    synchronisation is added to the step."""
    from megatron.training.loop import phase_clock

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    clock = phase_clock(torch.device(device), timers)
    assert clock() <= clock()
    assert len(calls) == syncs and all(d == torch.device(device) for d in calls)
