"""One GPU: checkpoints saved on the GPU load on the CPU and back -- the weights bit for bit, and a run
resumed on the other device continues the same training (model, optimizer, scheduler, RNG and data
position restored)."""

import argparse

import torch

from megatron.testing.training import tiny_argv

from megatron.checkpoint import load_checkpoint, save_checkpoint
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from pretrain_early_exit_gpt import main

CFG = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                  make_vocab_size_divisible_by=64, seq_length=16, normalization="RMSNorm", swiglu=True,
                  position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True)
EE = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True)


def _args():
    return argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, consumed_train_samples=0,
                              consumed_valid_samples=0)


def _model(device, initialize=True):
    return EarlyExitGPTModel(CFG, EE, state=ParallelState.single(device), initialize=initialize)


def _round_trip(src, dst_device, path):
    save_checkpoint(str(path), 1, [src], None, None, ParallelState.single(next(src.parameters()).device), _args(),
                    save_optim=False, save_rng=False)
    dst = _model(dst_device, initialize="skip")
    load_checkpoint(str(path), [dst], None, None, ParallelState.single(dst_device), _args(), finetune=True)
    return dst


def test_weights_round_trip_gpu_cpu_gpu(device, tmp_path):
    on_gpu = _model(device)
    on_cpu = _round_trip(on_gpu, torch.device("cpu"), tmp_path / "from_gpu")
    back = _round_trip(on_cpu, device, tmp_path / "from_cpu")
    for (name, a), b, c in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values(), back.state_dict().values()):
        assert b.device.type == "cpu" and c.device.type == device.type, name
        assert torch.equal(a.cpu(), b) and torch.equal(c, a), name


def test_training_resumes_across_devices(device_flag, tmp_path):
    """A 4-iteration run stopped (--exit-interval) and resumed on the other device: the GPU saves at 2, the
    CPU resumes for iteration 3 (as the GPU resuming does) and saves, the GPU finishes from that."""
    def run(dev, stop, **flags):
        argv = tiny_argv("--device", dev, train_iters=4, exit_interval=stop, save_interval=100, hidden_dropout=0,
                         attention_dropout=0, **flags)
        return main(argv).history

    first, second = tmp_path / "gpu", tmp_path / "cpu"
    run(device_flag, 2, save=first)
    on_cpu = run("cpu", 3, load=first, save=second)
    on_gpu = run(device_flag, 3, load=first)
    assert [h["iteration"] for h in on_cpu] == [h["iteration"] for h in on_gpu] == [3]
    for key, value in on_gpu[0]["losses"].items():
        assert abs(on_cpu[0]["losses"][key] - value) <= 1e-4 * abs(value), key
    assert [h["iteration"] for h in run(device_flag, 100, load=second)] == [4]
