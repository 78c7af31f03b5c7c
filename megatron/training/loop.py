"""The training loop: one step, evaluation, console / tracker logging, periodic saves and exit criteria.

Per iteration (Megatron's order): zero the gradient buffers, read every microbatch the schedule needs,
run :func:`~megatron.training.forward_backward.forward_backward` with the exit-loss weights of this
iteration (a pure function of it, so a resumed run recomputes them), step the optimizer on every rank
and advance the scheduler only when the step succeeded; then log, evaluate, save, and stop on
``--exit-interval``, ``--exit-duration-in-mins`` or a signal (``--exit-signal-handler``) after saving.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megatron.data.batch_utils import model_inputs
from megatron.model import exit_weights
from megatron.training.forward_backward import forward_backward
from megatron.training.logging_utils import ProgressBar, format_eval_line, format_train_line, has_ppl, ppl
from megatron.training.metrics import IntervalStats, flops_per_iteration, loss_keys, peak_memory_mb, reduce_losses
from megatron.training.resume import save_run
from megatron.training.setup import TrainingRun, read_text, set_train_mode
from megatron.training.signal_handler import DistributedSignalHandler
from megatron.training.trackers import Trackers

__all__ = ["StepResult", "TrainResult", "phase_clock", "train_step", "evaluate", "train"]

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One iteration, reduced over the whole model: losses of every exit, the optimizer's outcome."""

    losses: dict[str, float]
    ok: bool
    grad_norm: float | None
    num_zeros: int | None
    exit_weights: dict[int, float]
    timers: dict[str, float]


@dataclass
class TrainResult:
    """What a run did (returned by ``pretrain``; tests compare these)."""

    iteration: int = 0
    history: list[dict] = field(default_factory=list)  # per iteration: losses, lr, grad norm, ...
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # console lines printed by this rank
    exit_reason: str = "finished"


def _batches(run: TrainingRun, iterator, n: int) -> Callable[[int], dict]:
    """Microbatch ``mb`` of the step, for the schedule. The ``n`` token tensors are read now, in id order
    (the data order must not depend on the schedule, and ids are small); the model inputs -- with
    --reset-attention-mask a ``[b, 1, s, s]`` mask per microbatch, ~2 GiB per step for EE-LLM's 1.3B
    configuration if built for the whole step -- are built only when a forward asks for them."""
    texts = [read_text(run, iterator) for _ in range(n)]
    d = run.cfg.data
    return lambda mb: model_inputs(texts[mb], run.eod, d.reset_position_ids, d.reset_attention_mask,
                                   d.eod_mask_loss)


def phase_clock(device: torch.device, synchronize: bool) -> Callable[[], float]:
    """``time.perf_counter``, taken after the device's queued work when ``synchronize`` (per-phase timers
    are reported). CUDA runs kernels asynchronously: unsynchronised, a phase would measure how long it took
    to queue its kernels and the next phase would absorb the rest. Without timers no synchronisation is
    added: the iteration time of the log line is right anyway, since every step ends by reading its
    losses on the host, which waits for everything queued before."""
    if not (synchronize and device.type == "cuda"):
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def train_step(run: TrainingRun) -> StepResult:
    """One iteration at ``run.iteration`` (completed iterations so far); collective over the world."""
    cfg, opt = run.cfg, run.optimizer
    weights = exit_weights(run.iteration, cfg.early_exit)
    clock = phase_clock(run.state.device, cfg.logging.log_timers_to_tracker)
    t0 = clock()
    for buffers in run.buffers:
        buffers.zero_grad()
    batches = _batches(run, run.train_iter, run.schedule.header.num_microbatches_total)
    t1 = clock()
    local = forward_backward(
        run.schedule, run.chunks, batches, run.state, tensor_shape=run.tensor_shape,
        exit_weights=weights, grad_buffers=run.buffers, tied_groups=run.tied_groups,
        loss_scale=opt.loss_scale if opt.grad_scaler is not None else None).mean()
    t2 = clock()
    ok, grad_norm, zeros = opt.step()
    if ok:
        run.scheduler.step(cfg.training.global_batch_size)
    t3 = clock()
    losses = reduce_losses(local, loss_keys(cfg.early_exit), run.state)
    timers = {"batch-generator": t1 - t0, "forward-backward": t2 - t1, "optimizer": t3 - t2}
    return StepResult(losses, ok, grad_norm, zeros, weights, timers)


def evaluate(run: TrainingRun) -> dict[str, float]:
    """Mean losses (final and every exit) over ``--eval-iters`` validation batches."""
    t = run.cfg.training
    keys = loss_keys(run.cfg.early_exit)
    sums: dict[str, float] = {}
    for chunk in run.chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(t.eval_iters):
                batches = _batches(run, run.valid_iter, run.eval_schedule.header.num_microbatches_total)
                local = forward_backward(run.eval_schedule, run.chunks, batches, run.state,
                                         tensor_shape=run.tensor_shape, exit_weights={}).mean()
                for k, v in reduce_losses(local, keys, run.state).items():
                    sums[k] = sums.get(k, 0.0) + v
                run.consumed_valid_samples += t.global_batch_size
    finally:
        set_train_mode(run.chunks, t.tune_exit)
    return {k: v / t.eval_iters for k, v in sums.items()}


class _Reporter:
    """Console lines, progress bar and trackers, on the one rank that reports (global rank 0)."""

    def __init__(self, run: TrainingRun, trackers: Trackers, result: TrainResult):
        self.run, self.trackers, self.result = run, trackers, result
        self.active = run.state.rank == 0
        self.stats = IntervalStats()
        self.bar = ProgressBar(run.train_iters, run.iteration) if self.active else None
        cfg = run.cfg
        self.flops = flops_per_iteration(cfg.model, cfg.early_exit, cfg.model.padded_vocab(cfg.parallel.tp),
                                         cfg.training.global_batch_size, cfg.training.tune_exit)

    def print(self, line: str) -> None:
        if self.active:
            self.bar.clear()
            print(line, flush=True)
            self.result.lines.append(line)

    def step(self, step: StepResult, elapsed: float) -> None:
        run, cfg = self.run, self.run.cfg
        it, lr = run.iteration, run.scheduler.get_lr()
        self.result.history.append({"iteration": it, "losses": dict(step.losses), "lr": lr, "ok": step.ok,
                                    "grad_norm": step.grad_norm, "loss_scale": run.optimizer.loss_scale,
                                    "exit_weights": dict(step.exit_weights)})
        self.stats.add(step.losses, not step.ok, elapsed)
        if not self.active:
            return
        self._track(step, lr)
        if it % cfg.logging.log_interval == 0:
            self._log_line(step, lr)
        self.bar.update(it)

    def _track(self, step: StepResult, lr: float) -> None:
        run, lc = self.run, self.run.cfg.logging
        if not self.trackers or run.iteration % lc.tracker_log_interval:
            return
        values = dict(step.losses)
        values.update({f"exit weight [{k}]": w for k, w in step.exit_weights.items()})
        if lc.log_learning_rate_to_tracker:
            values["learning-rate"] = lr
        if lc.log_loss_scale_to_tracker:
            values["loss-scale"] = run.optimizer.loss_scale
        if step.grad_norm is not None:
            values["grad-norm"] = step.grad_norm
        if lc.log_batch_size_to_tracker:
            values["batch-size"] = run.cfg.training.global_batch_size
        if lc.log_world_size_to_tracker:
            values["world-size"] = run.cfg.parallel.world_size
        if lc.log_memory_to_tracker:
            values["peak-memory-mb"] = peak_memory_mb(run.state.device)
        self.trackers.log("train", values, run.iteration)
        if lc.log_timers_to_tracker:
            self.trackers.log("timer", step.timers, run.iteration)

    def _log_line(self, step: StepResult, lr: float) -> None:
        run, s = self.run, self.stats
        t = run.cfg.training
        seconds = s.time_per_iteration
        self.print(format_train_line(
            iteration=run.iteration, train_iters=run.train_iters, consumed_samples=run.consumed_train_samples,
            ms_per_iteration=seconds * 1000.0, learning_rate=lr, global_batch_size=t.global_batch_size,
            losses=s.mean_losses(), exit_weights=step.exit_weights, loss_scale=run.optimizer.loss_scale,
            grad_norm=step.grad_norm, num_zeros=step.num_zeros, skipped=s.skipped, nan=s.nan,
            tokens_per_second=t.global_batch_size * run.cfg.model.seq_length / max(seconds, 1e-9),
            tflops_per_device=self.flops / max(seconds, 1e-9) / run.cfg.parallel.world_size / 1e12,
            peak_memory_mb=peak_memory_mb(run.state.device)))
        self.stats = IntervalStats()

    def evaluation(self, where: str, losses: dict[str, float]) -> None:
        self.result.evaluations.append((self.run.iteration, dict(losses)))
        self.print(format_eval_line(where, losses))
        if self.active and self.trackers:
            values = dict(losses)
            if self.run.cfg.logging.log_validation_ppl_to_tracker:
                values.update({f"{k} ppl": ppl(v) for k, v in losses.items() if has_ppl(k)})
            self.trackers.log("validation", values, self.run.iteration)


def _any_rank(flag: bool, state) -> bool:
    """MAX of ``flag`` over the world (every rank must stop at the same iteration)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=state.device if state.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _stop_reason(run: TrainingRun, handler, start_time: float) -> str | None:
    t = run.cfg.training
    if handler is not None and handler.signals_received():
        return "signal"
    if t.exit_duration_in_mins is not None:
        if _any_rank((time.time() - start_time) / 60.0 > t.exit_duration_in_mins, run.state):
            return "duration"
    if t.exit_interval is not None and run.iteration % t.exit_interval == 0:
        return "interval"
    return None


def train(run: TrainingRun, trackers: Trackers, start_time: float | None = None) -> TrainResult:
    """Train from ``run.iteration`` to ``run.train_iters`` (or an exit criterion); collective."""
    t, c = run.cfg.training, run.cfg.checkpoint
    first = run.iteration
    result = TrainResult(iteration=first)
    reporter = _Reporter(run, trackers, result)
    start_time = time.time() if start_time is None else start_time
    handler = DistributedSignalHandler() if t.exit_signal_handler else None
    with handler if handler is not None else contextlib.nullcontext():
        while not t.skip_train and run.iteration < run.train_iters:
            t0 = time.perf_counter()
            step = train_step(run)
            run.iteration += 1
            run.consumed_train_samples += run.samples_per_iteration
            reporter.step(step, time.perf_counter() - t0)
            if run.has_valid and run.iteration % t.eval_interval == 0:
                reporter.evaluation(f"iteration {run.iteration}", evaluate(run))
            if c.save and c.save_interval and run.iteration % c.save_interval == 0:
                save_run(run)
            reason = _stop_reason(run, handler, start_time)
            if reason is not None:
                if c.save and run.last_saved != run.iteration:
                    save_run(run)
                log.info("exiting at iteration %d (%s)", run.iteration, reason)
                result.exit_reason = reason
                break
    if result.exit_reason == "finished":
        if c.save and run.iteration > first and run.last_saved != run.iteration:
            save_run(run)
        if run.has_valid:
            reporter.evaluation(f"iteration {run.iteration} on validation set", evaluate(run))
    result.iteration = run.iteration
    return result
