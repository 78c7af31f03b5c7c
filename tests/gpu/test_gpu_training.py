"""One GPU: a training step of a small early-exit Llama in bf16 equals the CPU fp32 step (final and every
exit loss, grad norm), the forward queues its work without a host synchronisation, weights drawn on the
GPU are layout-independent, and the RNG tracker's CUDA stream neither repeats nor rewinds the default."""

import pytest
import torch
import torch.nn.functional as F

from megatron.config import EarlyExitConfig
from megatron.core import tensor_parallel as tpl
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.pipeline_parallel.runtime import StepLosses
from megatron.core.transformer import SeededInit
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import tiny_config
from megatron.testing.training import tiny_argv
from pretrain_early_exit_gpt import main

# A small early-exit Llama: RMSNorm, SwiGLU, RoPE, grouped KV heads, untied head; the CPU's weights.
LLAMA = ("--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--group-query-attention",
         "--num-query-groups", "2", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--use-cpu-initialization")


def _history(device: str, *flags):
    argv = tiny_argv(*LLAMA, "--device", device, *flags, hidden_dropout=0, attention_dropout=0, train_iters=2,
                     init_method_std=0.05)
    return main(argv).history


def test_bf16_step_equals_the_cpu_fp32_step(device_flag):
    """Same weights (drawn on the CPU), data and flags: the first step's losses and gradient norm in bf16
    on the GPU are the fp32 CPU step's within bf16's rounding, and so is the loss after one update."""
    want = _history("cpu")
    got = _history(device_flag, "--bf16")
    assert set(got[0]["losses"]) == set(want[0]["losses"]) == {"lm loss", "early loss [1]", "early loss [3]"}
    for g, w in zip(got, want):
        for key, value in w["losses"].items():
            assert abs(g["losses"][key] - value) <= 3e-2, (g["iteration"], key, g["losses"][key], value)
    assert abs(got[0]["grad_norm"] - want[0]["grad_norm"]) <= 5e-2 * want[0]["grad_norm"]


def _tiny_model(device, dtype=torch.float32):
    cfg = tiny_config("llama", hidden_size=64, ffn_hidden_size=None, vocab_size=128, make_vocab_size_divisible_by=64,
                      seq_length=32, params_dtype=dtype)
    return EarlyExitGPTModel(cfg, EarlyExitConfig(exit_layer_nums=[2]), state=ParallelState.single(device))


def test_training_forward_never_waits_for_the_gpu(device):
    """The forward of a microbatch and the bookkeeping of its losses queue kernels only: id, target and
    position checks run on the device, losses stay there (sync debug mode turns any host wait into an
    error)."""
    model = _tiny_model(device)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 128, (2, 33), generator=g).to(device)
    ids, labels, mask = text[:, :-1], text[:, 1:], torch.ones(2, 32, device=device)
    losses = StepLosses()
    model(input_ids=ids, labels=labels)  # warm-up: first-call set-up may synchronise
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = model(input_ids=ids, labels=labels)
            losses.add("lm loss", (out.output * mask).sum() / mask.sum())
            losses.add("early loss [2]", (out.exit_losses[2] * mask).sum() / mask.sum())
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    means = losses.mean()
    assert set(means) == {"lm loss", "early loss [2]"} and all(3.0 < v < 7.0 for v in means.values())


@pytest.mark.parametrize("tp", [2, 4])
def test_weights_drawn_on_the_gpu_are_layout_independent(device, tp):
    """Each tp rank draws the full weight on its device and keeps its shard: the shards put together
    are the tp = 1 weight, on the GPU's generator as on the CPU's."""
    recipe = SeededInit(seed=3, std=0.02, num_layers=2)

    def weights(state):
        col = tpl.ColumnParallelLinear(64, 128, state=state, stride=2, init_method=recipe.normal(1, "h_to_4h"))
        row = tpl.RowParallelLinear(128, 64, state=state, init_method=recipe.scaled(1, "4h_to_h"))
        return col.weight.detach(), row.weight.detach()

    col1, row1 = weights(ParallelState.single(device))
    assert col1.device.type == device.type
    shards = [weights(ParallelState(dims=ParallelDims(tp=tp), rank=r, device=device)) for r in range(tp)]
    torch.testing.assert_close(tpl.unshard_tensors([s[0] for s in shards], 0, 2), col1, rtol=0, atol=0)
    torch.testing.assert_close(tpl.unshard_tensors([s[1] for s in shards], 1), row1, rtol=0, atol=0)
    cpu_drawn = SeededInit(seed=3, std=0.02, num_layers=2, on_cpu=True)
    w = torch.empty(128, 64, device=device)
    cpu_drawn.normal(1, "h_to_4h")(w)
    expected = torch.empty(128, 64)
    SeededInit(seed=3, std=0.02, num_layers=2).normal(1, "h_to_4h")(expected)
    torch.testing.assert_close(w.cpu(), expected, rtol=0, atol=0)  # --use-cpu-initialization


def test_tracker_dropout_on_the_gpu_is_its_own_stream(device):
    """Tracker built before anything touched the GPU's generator: its dropout masks on the GPU come from
    its own seed, and the default generator continues where it was (not rewound to repeat them)."""
    tracker = tpl.model_parallel_seed(11, ParallelState.single(device))
    x = torch.ones(4096, device=device)
    with tracker.fork():
        inside = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    assert not torch.equal(inside, after)
    again = tpl.model_parallel_seed(11, ParallelState.single(device))
    with again.fork():
        assert torch.equal(F.dropout(x, 0.5), inside)
