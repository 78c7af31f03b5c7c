"""One reader for our flat and EE-LLM's nested model dicts (in one process, every stage of pp = 2 played by
its own model), and clear refusals of EE-LLM state our training cannot take over (optimizer, RNG)."""

import argparse
import os

import pytest
import torch

from megatron.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, read_file, save_checkpoint
from megatron.checkpoint.manifest import MANIFEST_FILE
from megatron.checkpoint.model_dicts import fit_to_model, model_dicts
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model.early_exit_gpt_model import EarlyExitGPTModel
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import full_state_dict_specs, shard_state_dict
from megatron.testing.ee_llm_checkpoint import nest_like_ee_llm

SINGLE = ParallelState.single()
LLAMA = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32, seq_length=8,
                    vocab_size=60, padded_vocab_size=64, normalization="RMSNorm", swiglu=True,
                    position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True)
GPT = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=8,
                  vocab_size=60, padded_vocab_size=64)
VARIANTS = {
    "llama-untied": (LLAMA, EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True,
                                            untie_exit_output_weights=True)),
    "gpt-tied-untied-exits": (GPT, EarlyExitConfig(exit_layer_nums=[1, 3], untie_exit_output_weights=True,
                                                   use_exit_block=True)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_nested_ee_llm_dicts_load_into_every_stage(variant):
    cfg, ee = VARIANTS[variant]
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(s.shape, generator=g) for k, s in full_state_dict_specs(cfg, ee).items()}
    part = partition(cfg.num_layers, 2, 1, ee.exit_layer_nums)
    for stage in range(2):
        ours = shard_state_dict(full, cfg, 1, 0, part, stage, 0, ee)
        theirs = shard_state_dict(full, cfg, 1, 0, part, stage, 0, ee, ee_llm=True)
        nested = {"model": nest_like_ee_llm(theirs)}
        assert "language_model" in nested["model"] and not any("." in k for k in nested["model"]["language_model"])
        (flat,) = model_dicts(nested, "f.pt", 1, "hint")
        assert flat.keys() == theirs.keys()
        model = EarlyExitGPTModel(cfg, ee, state=SINGLE, partition=part, stage=stage, initialize=False)
        model.load_state_dict(fit_to_model(flat, set(model.state_dict())), strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(value, ours[key]), key


def test_model_entries_must_match_the_chunks():
    with pytest.raises(CheckpointError, match=r"f.pt holds model chunks \['model'\], expected \['model0', 'model1'\]"):
        model_dicts({"model": {}}, "f.pt", 2, "use the same vpp")
    with pytest.raises(CheckpointError, match="model entry language_model.encoder.x is a str"):
        model_dicts({"model": {"language_model": {"encoder": {"x": "oops"}}}}, "f.pt", 1, "")


def _args():
    return argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, consumed_train_samples=8,
                              consumed_valid_samples=0)


def _saved(tmp_path):
    """A checkpoint whose file the test rewrites as EE-LLM would have written it (EE-LLM writes no manifest)."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    save_checkpoint(str(tmp_path), 5, [model], opt, None, SINGLE, _args())
    os.remove(tmp_path / "iter_0000005" / MANIFEST_FILE)
    return model, opt, checkpoint_file(str(tmp_path), 5, 0, 0, 1)


def test_ee_llm_optimizer_state_is_refused_with_the_fix(tmp_path):
    model, opt, path = _saved(tmp_path)
    ckpt = read_file(path)
    # Megatron's Float16OptimizerWithFloat16Params.state_dict(): apex's state under "optimizer".
    ckpt["optimizer"] = {"optimizer": ckpt["optimizer"], "fp32_from_fp16_params": [], "grad_scaler": None}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"model_optim_rng.pt holds an optimizer state .*--finetune.*"
                                              r"--no-load-optim"):
        load_checkpoint(str(tmp_path), [model], opt, None, SINGLE, _args())
    assert load_checkpoint(str(tmp_path), [model], opt, None, SINGLE, _args(), no_load_optim=True) == 5


def test_ee_llm_rng_tracker_states_are_refused_with_the_fix(tmp_path):
    from megatron.core.tensor_parallel.random import model_parallel_seed

    model, opt, path = _saved(tmp_path)
    ckpt = read_file(path)
    # Megatron's CudaRNGStatesTracker.get_states(): one CUDA generator state per stream.
    ckpt["rng_state"][0]["rng_tracker_states"] = {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}
    torch.save(ckpt, path)
    tracker = model_parallel_seed(1, SINGLE)
    with pytest.raises(CheckpointError, match="holds RNG states this run cannot restore.*--no-load-rng"):
        load_checkpoint(str(tmp_path), [model], opt, None, SINGLE, _args(), rng_tracker=tracker)
    assert load_checkpoint(str(tmp_path), [model], opt, None, SINGLE, _args(), rng_tracker=tracker,
                           no_load_rng=True) == 5
