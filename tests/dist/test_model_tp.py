"""EarlyExitGPTModel under tensor parallelism (gloo): logits, final loss, every exit loss and every
gradient (shards gathered) equal the tp=1 model built from the same seed, for each exit-head variant,
tied / untied, pre / post, dynamic weights, with and without sequence parallelism and recompute; KV-cached
decoding under tp equals the full forward. Also the tied-copy
gradient sum over a real stage group (tp=1, pp=2, hidden state sent between the two processes)."""

import pytest
import torch
import torch.distributed as dist

from megatron.config import EarlyExitConfig
from megatron.core.distributed.finalize import TiedGroups, reduce_tied_grads
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.tensor_parallel import allreduce_sequence_parallel_grads, gather_full_tensor
from megatron.core.transformer import InferenceParams
from megatron.model import EarlyExitGPTModel
from megatron.testing.distributed import run_distributed
from megatron.testing.models import tiny_config

ARCHS = {
    "gpt": dict(normalization="LayerNorm", position_embedding_type="learned_absolute"),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=4,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True, ffn_hidden_size=48),
}
EE_VARIANTS = [
    dict(exit_layer_nums=[]),
    dict(use_exit_norm=True),
    dict(use_exit_norm=True, use_exit_mlp=True, use_dynamic_exit_layer_weight=True),
    dict(use_exit_block=True, untie_exit_output_weights=True, exit_layer_temperature=[0.5, 2.0]),
    dict(use_exit_mlp=True, use_exit_block=True, use_exit_norm=True),
    dict(pre_exit=True, use_exit_norm=True, use_exit_block=True, use_dynamic_exit_layer_weight=True),
    dict(pre_exit=True, untie_exit_output_weights=True),
]
WEIGHTS = (0.3, 0.7)


def _cases():
    for arch in ARCHS:
        for i, variant in enumerate(EE_VARIANTS):
            # sequence parallelism on every other case keeps the world count (and runtime) low
            yield arch, i, (i + (arch == "llama")) % 2 == 0


RECOMPUTE = [dict(), dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             dict(recompute_granularity="selective")]


def _configs(arch, i, sp):
    c = tiny_config(None, **RECOMPUTE[i % 3], num_layers=3, num_attention_heads=8, vocab_size=100,
                    make_vocab_size_divisible_by=32, seq_length=8, sequence_parallel=sp, seed=3, **ARCHS[arch])
    variant = dict(EE_VARIANTS[i])
    variant.setdefault("exit_layer_nums", [1, 3])
    return c, EarlyExitConfig(**variant)


def _data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _gather_last(x, state):
    if state.tp == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(state.tp)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)


def _run_case(state, arch, i, sp):
    c, ee = _configs(arch, i, sp)
    if state.tp == 1:
        c.sequence_parallel = False
    m = EarlyExitGPTModel(c, ee, state=state)
    ids, labels = _data()
    with torch.no_grad():
        probe = m(ids)
    logits = _gather_last(probe.output, state)
    exit_logits = {k: _gather_last(v, state) for k, v in probe.exit_logits.items()}
    out = m(ids, labels=labels)
    loss = out.output.mean() + sum(w * out.exit_losses[k].mean() for k, w in zip(ee.exit_layer_nums, WEIGHTS))
    loss.backward()
    allreduce_sequence_parallel_grads(m, state)
    cached = {}
    if not c.sequence_parallel:  # KV-cached decoding under tp: prompt of 5, then 3 single tokens
        m.eval()
        ip = InferenceParams(2, 8)
        for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):
            inf = m.infer(ids[:, start:end], inference_params=ip, exits=ee.exit_layer_nums, num_last=1)
            per_seq = lambda view: view.per_sequence(view.logits())  # noqa: E731 -- [b, 1, vocab]
            cached[end] = (per_seq(inf.final) if inf.final is not None else None,
                           {k: per_seq(view) for k, view in inf.exits.items()})
            ip.sequence_len_offset = end
    params = {k: gather_full_tensor(p, p, state) for k, p in m.named_parameters()}
    grads = {k: gather_full_tensor(p, p.grad, state) for k, p in m.named_parameters()}
    return dict(logits=logits, exit_logits=exit_logits, final=out.output.detach(),
                exits={k: v.detach() for k, v in out.exit_losses.items()}, params=params, grads=grads,
                cached=cached)


def _tp_worker(rank, world):
    state = ParallelState.build(ParallelDims(tp=world))
    results = {case: _run_case(state, *case) for case in _cases()}
    return results if rank == 0 else None


def _compare(got, ref, case):
    msg = f"case {case}"
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5, msg=msg)
    torch.testing.assert_close(got["final"], ref["final"], rtol=1e-5, atol=1e-6, msg=msg)
    assert got["exits"].keys() == ref["exits"].keys() == got["exit_logits"].keys()
    for k in ref["exits"]:
        torch.testing.assert_close(got["exits"][k], ref["exits"][k], rtol=1e-5, atol=1e-6, msg=msg)
        torch.testing.assert_close(got["exit_logits"][k], ref["exit_logits"][k], rtol=1e-5, atol=1e-5, msg=msg)
    for end, (logits, exit_logits) in got["cached"].items():
        v = logits.shape[-1]  # the real vocabulary: inference never reads the padding
        torch.testing.assert_close(logits, got["logits"][:, end - 1:end, :v], rtol=1e-5, atol=1e-5, msg=msg)
        for k, x in exit_logits.items():
            torch.testing.assert_close(x, got["exit_logits"][k][:, end - 1:end, :v], rtol=1e-5, atol=1e-5, msg=msg)
    assert got["params"].keys() == ref["params"].keys()
    for k in ref["params"]:
        assert torch.equal(got["params"][k], ref["params"][k]), f"{msg}: init of {k}"
        torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-6, msg=f"{msg}: {k}")


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_serial(tp):
    (results, *_) = run_distributed(_tp_worker, tp, timeout=240)
    single = ParallelState.single()
    for case, got in results.items():
        _compare(got, _run_case(single, *case), case)


def _pp_worker(rank, world):
    """Two stages, one exit per stage, tied to the word embedding: copies on both stages."""
    state = ParallelState.build(ParallelDims(pp=2))
    c, ee = _configs("gpt", 1, False)
    m = EarlyExitGPTModel(c, ee, state=state, layers_per_stage=[2, 1])
    ids, labels = _data()
    if state.is_first_stage:
        out = m(ids, labels=labels)
        dist.send(out.output.detach(), state.next_rank)
        grad = torch.empty_like(out.output)
        dist.recv(grad, state.next_rank)
        torch.autograd.backward([out.output, WEIGHTS[0] * out.exit_losses[1].mean()], [grad, None])
    else:
        h = torch.empty(8, 2, 32)
        dist.recv(h, state.prev_rank)
        h.requires_grad_(True)
        out = m(hidden_states=h, labels=labels)
        (out.output.mean() + WEIGHTS[1] * out.exit_losses[3].mean()).backward()
        dist.send(h.grad, state.prev_rank)
    reduce_tied_grads([m], TiedGroups([m], state), attr="grad")  # training's reduction (finalize_model_grads)
    return {k: p.grad.clone() for k, p in m.tied_parameters().items()}


def test_tied_copies_get_the_summed_gradient():
    got = run_distributed(_pp_worker, 2)
    c, ee = _configs("gpt", 1, False)
    ref = EarlyExitGPTModel(c, ee, state=ParallelState.single())
    ids, labels = _data()
    out = ref(ids, labels=labels)
    (out.output.mean() + WEIGHTS[0] * out.exit_losses[1].mean() + WEIGHTS[1] * out.exit_losses[3].mean()).backward()
    want = ref.language_model.embedding.word_embeddings.weight.grad
    for rank_grads in got:
        torch.testing.assert_close(rank_grads["word_embeddings"], want, rtol=1e-5, atol=1e-7)
