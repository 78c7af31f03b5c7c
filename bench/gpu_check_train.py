"""GPU check, training stage: step time, tokens/s, MFU and peak memory of EE-LLM's 1.3B shape on one GPU,
with its two exits and without, at the largest micro-batch that fits (run by ``bench/gpu_check.py``).

The shape: 24 layers, hidden 2048, 16 heads (the issue's; EE-LLM's 1-3B.sh has 32 of 64 channels, which
changes no FLOP count), sequence 2048, Llama-style as EE-LLM's scripts (RMSNorm, RoPE, SwiGLU with its
derived FFN 5440, no biases, tied embeddings, vocabulary 32000), bf16 with fp32 masters and
``--use-flash-attn``; exits as ``examples/ee_training/1-3B.sh`` (pre-exits at 7 and 13, i.e. after layers
6 and 12, weights 0.25 / 0.5, tied to the embedding). A step is the real ``train_step`` (``forward_backward``
over the microbatches, gradient finalisation, clipping at 1.0, AdamW), on random token batches already
pinned on the host. The micro-batch search doubles from 2 while a step with exits fits in memory (then
tries the midpoint below the first that did not), and both configurations are timed at the size found.

MFU = model FLOPs of a step (``megatron.training.metrics.flops_per_iteration``: every matmul, exit heads
included, attention counted whole as Megatron does) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time

import torch

from megatron.arguments import parse_args
from megatron.training.loop import train_step
from megatron.training.metrics import flops_per_iteration
from megatron.training.setup import build_run, initialize

__all__ = ["run", "peak_bf16_tflops", "SHAPE", "SMOKE_SHAPE"]

SHAPE = dict(layers=24, hidden=2048, heads=16, seq=2048, vocab=32000, exits=(7, 13), weights=(0.25, 0.5),
             microbatches=4, candidates=(2, 4, 8, 16, 32, 64), warmup=1, steps=4, dtype="--bf16")
# CPU smoke: the same code on a 2-layer model in fp32 (bf16 matmuls are 50x slower on CPUs).
SMOKE_SHAPE = dict(layers=2, hidden=64, heads=4, seq=64, vocab=256, exits=(2,), weights=(0.5,), microbatches=2,
                   candidates=(1, 2), warmup=1, steps=2, dtype=None)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by device-name fragment; first match wins.
_PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
          ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0),
          ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("V100", 125.0))


def peak_bf16_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((peak for fragment, peak in _PEAKS if fragment in device_name), None)


def _argv(shape: dict, micro_batch: int, microbatches: int, exits: bool, device: str) -> list[str]:
    argv = ["--num-layers", shape["layers"], "--hidden-size", shape["hidden"], "--num-attention-heads", shape["heads"],
            "--seq-length", shape["seq"], "--max-position-embeddings", shape["seq"], "--vocab-size", shape["vocab"],
            "--make-vocab-size-divisible-by", 128, "--micro-batch-size", micro_batch,
            "--global-batch-size", micro_batch * microbatches, "--train-iters", 1000, "--lr", 3e-4,
            "--min-lr", 3e-5, "--weight-decay", 0.1, "--adam-beta2", 0.95, "--clip-grad", 1.0,
            "--init-method-std", 0.01, "--disable-bias-linear", "--use-flash-attn", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--swiglu", "--mock-data", "--eval-iters", 0, "--num-workers", 0,
            "--log-interval", 1000, "--device", device]
    if shape["dtype"]:
        argv.append(shape["dtype"])
    if exits:
        argv += ["--exit-layer-nums", *shape["exits"], "--exit-layer-weight", *shape["weights"], "--pre-exit"]
    return [str(a) for a in argv]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(argv: list[str]):
    args = parse_args(argv)
    cfg, state, _ = initialize(args)
    run = build_run(args, cfg, state)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, cfg.model.vocab_size, (cfg.training.micro_batch_size, cfg.model.seq_length + 1),
                         generator=g)
    if state.device.type == "cuda":
        text = text.pin_memory()
    run.train_iter = itertools.repeat({"text": text})
    return run


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fits(shape: dict, micro_batch: int, device: str) -> bool:
    """One step with exits (the larger configuration) at ``micro_batch`` runs without running out of memory."""
    run, ok = None, True
    try:
        run = _build(_argv(shape, micro_batch, 1, True, device))
        train_step(run)
        _sync(run.state.device)
    except torch.cuda.OutOfMemoryError:
        ok = False  # handled outside: the traceback keeps the failed step's tensors alive
    del run
    _release()
    return ok


def largest_micro_batch(shape: dict, device: str, deadline: float) -> tuple[int | None, list[dict]]:
    """The largest candidate micro-batch (doubling, then the midpoint below the first failure) that fits."""
    tried, best, failed = [], None, None
    for mb in shape["candidates"]:
        if time.monotonic() > deadline:
            break
        ok = _fits(shape, mb, device)
        tried.append({"micro_batch": mb, "fits": ok})
        if not ok:
            failed = mb
            break
        best = mb
    if best is not None and failed is not None and (best + failed) // 2 not in (best, failed):
        mid = (best + failed) // 2
        if time.monotonic() < deadline:
            ok = _fits(shape, mid, device)
            tried.append({"micro_batch": mid, "fits": ok})
            best = mid if ok else best
    return best, tried


def time_config(shape: dict, micro_batch: int, exits: bool, device: str, peak: float | None,
                deadline: float) -> dict:
    """Median step of ``shape["steps"]`` timed steps after the warm-up (fewer, at least one, when
    ``deadline`` (monotonic) comes first)."""
    run = _build(_argv(shape, micro_batch, shape["microbatches"], exits, device))
    dev = run.state.device
    for _ in range(shape["warmup"]):
        train_step(run)
        run.iteration += 1
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], None
    for _ in range(shape["steps"]):
        if times and time.monotonic() > deadline:
            break
        _sync(dev)
        start = time.perf_counter()
        step = train_step(run)
        _sync(dev)
        times.append(time.perf_counter() - start)
        run.iteration += 1
        losses = step.losses
    cfg = run.cfg
    flops = flops_per_iteration(cfg.model, cfg.early_exit, cfg.model.padded_vocab(cfg.parallel.tp),
                                cfg.training.global_batch_size)
    seconds = statistics.median(times)
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    out = {"exits": list(cfg.early_exit.exit_layer_nums), "micro_batch": micro_batch,
           "global_batch": cfg.training.global_batch_size, "step_s": seconds, "step_s_all": times,
           "tokens_per_s": tokens / seconds, "tflops_per_s": flops / seconds / 1e12, "model_flops_per_step": flops,
           "mfu": None if peak is None else flops / seconds / (peak * 1e12),
           "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
           "losses": losses, "params": sum(p.numel() for c in run.chunks for p in c.parameters())}
    del run
    _release()
    return out


def run(smoke: bool, deadline: float) -> dict:
    """The stage's result: both configurations at the micro-batch found, and the search. ``deadline``
    (monotonic): the search may use 40 % of the time left, each configuration's timing a further 30 %."""
    shape = SMOKE_SHAPE if smoke else SHAPE
    device = "cpu" if smoke else "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = peak_bf16_tflops(name)
    start, left = time.monotonic(), deadline - time.monotonic()
    mb, tried = largest_micro_batch(shape, device, start + 0.4 * left)
    if mb is None:
        return {"error": "no micro-batch fits (or the time ran out before one was tried)", "search": tried}
    configs = [time_config(shape, mb, exits, device, peak, start + share * left)
               for exits, share in ((False, 0.6), (True, 0.9))]
    base, with_exits = configs
    return {"shape": {k: v for k, v in shape.items() if k != "candidates"}, "device": name, "peak_bf16_tflops": peak,
            "search": tried, "configs": configs, "exit_overhead": with_exits["step_s"] / base["step_s"] - 1.0}
