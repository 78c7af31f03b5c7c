"""One GPU: cached generation on the GPU gives the CPU's greedy tokens (full depth and early exit, with
the same exit layers), and self-speculative decoding on the GPU gives the GPU's greedy tokens."""

import pytest
import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, SamplingParams
from megatron.tokenizer.null import NullTokenizer

VOCAB = 256
# A larger init std than Megatron's gives peaked next-token distributions: greedy choices then do not
# hinge on the last bit of a logit, and exits are sometimes confident.
CFG = dict(num_layers=6, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
           make_vocab_size_divisible_by=64, seq_length=64, normalization="RMSNorm", swiglu=True,
           position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
           untie_embeddings_and_output_weights=True, init_method_std=0.3, seed=5)
EE = EarlyExitConfig(exit_layer_nums=[2, 4], use_exit_norm=True)
DECODINGS = {
    "full": EarlyExitParams(),
    "early exit": EarlyExitParams(use_early_exit=True, early_exit_thres=0.6),
    "speculative": EarlyExitParams(decoding="speculative", draft_exit_layer=2, num_speculative_tokens=3),
}


def _engine(device):
    cfg = ModelConfig(**CFG)
    cpu = EarlyExitGPTModel(cfg, EE, state=ParallelState.single()).eval()
    model = EarlyExitGPTModel(cfg, EE, state=ParallelState.single(device), initialize=False).eval()
    model.load_state_dict(cpu.state_dict())
    state = ParallelState.single(device)
    return InferenceEngine([model], state, NullTokenizer(VOCAB - 1), cfg, EE)


@pytest.fixture(scope="module")
def engines(device):
    return _engine(torch.device("cpu")), _engine(device)


def _decode(engine, decoding: str):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in (7, 12)]
    sampling = SamplingParams(tokens_to_generate=20, greedy=True)
    outs = [generate_tokens(engine, [p], sampling, DECODINGS[decoding]) for p in prompts]
    return [o.tokens[0] for o in outs], [o.exit_layers[0] for o in outs]


@pytest.mark.parametrize("decoding", ["full", "early exit"])
def test_gpu_generation_equals_the_cpu(engines, decoding):
    cpu, gpu = engines
    want, got = _decode(cpu, decoding), _decode(gpu, decoding)
    assert got == want
    if decoding == "early exit":
        assert any(layer < CFG["num_layers"] for layers in got[1] for layer in layers), "no token exited early"


def test_gpu_self_speculative_equals_gpu_greedy(engines):
    _, gpu = engines
    assert _decode(gpu, "speculative")[0] == _decode(gpu, "full")[0]
