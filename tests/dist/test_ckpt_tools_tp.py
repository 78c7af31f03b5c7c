"""Converted checkpoints load into real tp = 2 x pp = 2 models (gloo) and compute what the source computes:
a tiny HF Llama (GQA) converted by tools/checkpoint/util.py, with norm + MLP + block exits added by
checkpoint_converter.py, gives HF's final logits and the single-process exit logits on every rank."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from megatron.checkpoint import checkpoint_file, load_checkpoint, read_file  # noqa: E402
from megatron.core.parallel_state import ParallelDims, ParallelState  # noqa: E402
from megatron.model.early_exit_gpt_model import EarlyExitGPTModel  # noqa: E402
from megatron.run_config import RunConfig  # noqa: E402
from megatron.testing.distributed import run_distributed  # noqa: E402
from tools.checkpoint import checkpoint_converter, util  # noqa: E402
from tools.checkpoint.megatron_io import read_megatron  # noqa: E402
from tools.checkpoint.verify import full_logits  # noqa: E402

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))


def _worker(rank, world, root):
    state = ParallelState.build(ParallelDims.from_world(world, tp=2, pp=2))
    args = read_file(checkpoint_file(root, 1, state.tp_rank, state.pp_rank, 2))["args"]
    run = RunConfig.from_args(args)
    model = EarlyExitGPTModel(run.model, run.early_exit, state=state, initialize=False).eval()
    load_checkpoint(root, [model], None, None, state, args, finetune=True)
    with torch.no_grad():
        hidden = None
        if not state.is_first_stage:
            hidden = torch.empty(IDS.shape[1], IDS.shape[0], run.model.hidden_size)
            dist.recv(hidden, src=state.prev_rank)
        out = model(input_ids=IDS if state.is_first_stage else None, hidden_states=hidden)
        if not state.is_last_stage:
            dist.send(out.output.contiguous(), dst=state.next_rank)
            return state.tp_rank, None, out.exit_logits
    return state.tp_rank, out.output, out.exit_logits


def test_converted_llama_with_exits_runs_at_tp2_pp2(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        ref = hf(IDS).logits
    hf.save_pretrained(tmp_path / "hf")
    util.main(["--model-type", "EarlyExitGPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir",
               str(tmp_path / "hf"), "--save-dir", str(tmp_path / "plain"), "--target-tensor-parallel-size", "2",
               "--target-pipeline-parallel-size", "2"])
    checkpoint_converter.main(["--load-dir", str(tmp_path / "plain"), "--save-dir", str(tmp_path / "ee"),
                               "--add-exit-layer-nums", "1", "3", "4", "--use-exit-norm", "--use-exit-mlp",
                               "--use-exit-block"])
    ckpt = read_megatron(str(tmp_path / "ee"))
    _, ref_exits = full_logits(ckpt.full, ckpt.model, ckpt.ee, IDS)
    results = run_distributed(_worker, 4, str(tmp_path / "ee"))
    finals = [out for _, out, _ in sorted(results, key=lambda r: r[0]) if out is not None]
    torch.testing.assert_close(torch.cat(finals, dim=-1)[..., :100], ref, rtol=0, atol=1e-5)
    for layer in (1, 3, 4):
        shards = [exits[layer] for _, _, exits in sorted(results, key=lambda r: r[0]) if layer in exits]
        torch.testing.assert_close(torch.cat(shards, dim=-1), ref_exits[layer], rtol=0, atol=1e-5)
