"""Tiny engines, prompts and oracles for the generation tests (single process and gloo worlds alike).

- :func:`configs` / :func:`engine`: a random-weights early-exit model (:data:`VOCAB` = 96, 4 layers, GPT or
  Llama shape, exits where asked) and an ``InferenceEngine`` over this rank's chunk of it;
  :func:`tiny_vocab_engine`: vocabulary 12, so that a few thousand draws estimate a whole distribution;
- :func:`greedy`, :func:`exits`, :func:`spec`: ``SamplingParams`` / ``EarlyExitParams`` in one call;
  :data:`PROMPTS` and :func:`random_prompts` (seeded, of different lengths);
- oracles: :func:`oracle_greedy` (greedy decoding by cache-free full forwards), :func:`reference_cache` /
  :func:`cache_snapshot` / :func:`assert_cache_prefix` (every layer's KV against a full prefill), and
  :func:`chi_square_pvalue` (sampled counts against a distribution);
- :data:`CONFIDENCE_THRES` / :data:`CONFIDENCE_TOKENS`: per confidence measure, a threshold that some exits of
  the tiny GPT model pass and others do not, and the tokens generated per confidence check.
"""

from __future__ import annotations

import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.core.transformer import InferenceParams
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import ARCHS, tiny_config
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.request import EarlyExitParams, SamplingParams
from megatron.tokenizer.null import NullTokenizer

__all__ = ["VOCAB", "ARCHS", "PROMPTS", "CONFIDENCE_THRES", "CONFIDENCE_TOKENS", "configs", "engine",
           "tiny_vocab_engine", "greedy", "exits", "spec", "random_prompts", "oracle_greedy", "reference_cache",
           "cache_snapshot", "assert_cache_prefix", "chi_square_pvalue"]

VOCAB = 96
PROMPTS = [[5, 17, 33, 2, 60, 8], [41, 3, 9], [70, 12, 12, 90, 1]]
CONFIDENCE_THRES = {"top1": 0.3, "margin": 0.15, "entropy": 0.45, "cosine": 0.7}
CONFIDENCE_TOKENS = 6


def configs(arch: str = "llama", exits=(2,), num_layers: int = 4, **ee_kw) -> tuple[ModelConfig, EarlyExitConfig]:
    """The generation tests' model (vocabulary :data:`VOCAB`, 64 positions, init std 0.25, seed 11) and
    its exits at ``exits`` with ``ee_kw``."""
    c = tiny_config(arch, num_layers=num_layers, vocab_size=VOCAB, make_vocab_size_divisible_by=32, seq_length=64,
                    init_method_std=0.25, seed=11)
    return c, EarlyExitConfig(exit_layer_nums=list(exits), **ee_kw)


def engine(cfg: ModelConfig, ee: EarlyExitConfig, state: ParallelState | None = None) -> InferenceEngine:
    """An engine over this rank's chunk; the NullTokenizer's eod (= VOCAB) lies outside the model's
    vocabulary, so greedy decoding never stops early unless a test asks for a stop token."""
    state = state or ParallelState.single()
    model = EarlyExitGPTModel(cfg, ee, state=state)
    return InferenceEngine([model], state, NullTokenizer(VOCAB), cfg, ee)


def tiny_vocab_engine(state: ParallelState | None = None) -> InferenceEngine:
    """Vocabulary 12, so that a few thousand draws estimate the whole distribution."""
    cfg = tiny_config(None, hidden_size=16, num_attention_heads=2, vocab_size=12, make_vocab_size_divisible_by=4,
                      seq_length=16, init_method_std=0.3, seed=5, normalization="RMSNorm",
                      position_embedding_type="rope")
    ee = EarlyExitConfig(exit_layer_nums=[1])
    state = state or ParallelState.single()
    return InferenceEngine([EarlyExitGPTModel(cfg, ee, state=state)], state, NullTokenizer(12), cfg, ee)


def greedy(n: int = 6, **kw) -> SamplingParams:
    return SamplingParams(tokens_to_generate=n, greedy=True, **kw)


def exits(thres, method: str = "auto", **kw) -> EarlyExitParams:
    return EarlyExitParams(use_early_exit=True, early_exit_thres=thres, method=method, **kw)


def spec(k: int = 3, layer: int | None = None, **kw) -> EarlyExitParams:
    """Self-speculative decoding: ``k`` drafts per step from exit ``layer`` (``None``: the first exit)."""
    return EarlyExitParams(decoding="speculative", num_speculative_tokens=k, draft_exit_layer=layer, **kw)


def random_prompts(count: int, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """``count`` seeded prompts of 1 to 8 ids below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def oracle_greedy(model, prompt, n, exit_layer=None):
    """Greedy decoding by full forwards without any cache: the final head, or exit ``exit_layer``'s."""
    ids = list(prompt)
    for _ in range(n):
        out = model(torch.tensor([ids]))
        logits = out.output if exit_layer is None else out.exit_logits[exit_layer]
        ids.append(int(logits[0, -1, :VOCAB].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def reference_cache(model, tokens):
    """Every layer's KV after one full-depth prefill of ``tokens`` ``[b, s]`` (exit blocks included)."""
    kv = InferenceParams(tokens.shape[0], tokens.shape[1])
    model.infer(tokens, inference_params=kv, exits=model.spec.exits)
    return {layer: (k.clone(), v.clone()) for layer, (k, v) in kv.key_value_memory_dict.items()}


def cache_snapshot(kv, upto):
    """A copy of every layer's first ``upto`` cached positions."""
    return {layer: (k[:, :upto].clone(), v[:, :upto].clone()) for layer, (k, v) in kv.key_value_memory_dict.items()}


def assert_cache_prefix(snapshot, reference):
    """Each layer's snapshot equals the same rows and positions of the reference (1e-4 / 1e-5)."""
    for layer, (k, v) in snapshot.items():
        upto, b = k.shape[1], k.shape[0]
        ref_k, ref_v = reference[layer]
        torch.testing.assert_close(k, ref_k[:b, :upto], rtol=1e-4, atol=1e-5, msg=f"key of layer {layer}")
        torch.testing.assert_close(v, ref_v[:b, :upto], rtol=1e-4, atol=1e-5, msg=f"value of layer {layer}")


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``; cells expecting under 5 draws are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))
