"""Shared builders and oracles for the generation tests (single-process and gloo), plus the unit tests
of token selection (``megatron/text_generation/sampling.py``)."""

import pytest
import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.core.transformer import InferenceParams
from megatron.model import EarlyExitGPTModel
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.request import EarlyExitParams, SamplingParams
from megatron.text_generation.sampling import check_sampling, select_tokens, top_p_at
from megatron.tokenizer.null import NullTokenizer

VOCAB = 96
ARCHS = {
    "gpt": dict(normalization="LayerNorm", position_embedding_type="learned_absolute"),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True, ffn_hidden_size=48),
}
PROMPTS = [[5, 17, 33, 2, 60, 8], [41, 3, 9], [70, 12, 12, 90, 1]]


def configs(arch="llama", exits=(2,), num_layers=4, **ee_kw):
    c = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                    make_vocab_size_divisible_by=32, seq_length=64, hidden_dropout=0.0, attention_dropout=0.0,
                    init_method_std=0.25, seed=11, **ARCHS[arch])
    return c, EarlyExitConfig(exit_layer_nums=list(exits), **ee_kw)


def engine(cfg, ee, state=None):
    """An engine over this rank's chunk; the NullTokenizer's eod (= VOCAB) lies outside the model's
    vocabulary, so greedy decoding never stops early unless a test asks for a stop token."""
    state = state or ParallelState.single()
    model = EarlyExitGPTModel(cfg, ee, state=state)
    return InferenceEngine([model], state, NullTokenizer(VOCAB), cfg, ee)


def greedy(n=6, **kw):
    return SamplingParams(tokens_to_generate=n, greedy=True, **kw)


def exits(thres, method="auto", **kw):
    return EarlyExitParams(use_early_exit=True, early_exit_thres=thres, method=method, **kw)


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
    return {layer: (k[:, :upto].clone(), v[:, :upto].clone()) for layer, (k, v) in kv.key_value_memory_dict.items()}


def assert_cache_prefix(snapshot, reference):
    for layer, (k, v) in snapshot.items():
        upto, b = k.shape[1], k.shape[0]
        ref_k, ref_v = reference[layer]
        torch.testing.assert_close(k, ref_k[:b, :upto], rtol=1e-4, atol=1e-5, msg=f"key of layer {layer}")
        torch.testing.assert_close(v, ref_v[:b, :upto], rtol=1e-4, atol=1e-5, msg=f"value of layer {layer}")


# ---------------------------------------------------------------------------------- sampling unit tests

def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(400, generator=g, dtype=torch.float64)  # noqa: E731 -- each row's uniform number
    top_k = select_tokens(logits, SamplingParams(top_k=2), 0, u())
    assert set(top_k.tolist()) == {0, 1}
    top_p = select_tokens(logits, SamplingParams(top_p=0.7), 0, u())  # 0.5 < 0.7 <= 0.8: two tokens
    assert set(top_p.tolist()) == {0, 1}
    everything = select_tokens(logits, SamplingParams(), 0, u())
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert select_tokens(logits[:3], SamplingParams(greedy=True), 0, None).tolist() == [0, 0, 0]
    cold = select_tokens(logits, SamplingParams(temperature=0.01), 0, u())
    assert set(cold.tolist()) == {0}


def test_top_p_decays_per_step_down_to_its_bound():
    p = SamplingParams(top_p=0.8, top_p_decay=0.5, top_p_bound=0.3)
    assert [top_p_at(p, s) for s in range(3)] == [0.8, 0.4, 0.3]
    assert top_p_at(SamplingParams(top_p=0.8), 5) == 0.8


@pytest.mark.parametrize("bad, field", [(dict(top_k=2, top_p=0.5), "top_k and top_p"),
                                        (dict(temperature=0.0), "temperature"),
                                        (dict(tokens_to_generate=-1), "tokens_to_generate"),
                                        (dict(beam_width=0), "beam_width")])
def test_bad_sampling_parameters_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        check_sampling(SamplingParams(**bad))
