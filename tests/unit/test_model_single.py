"""EarlyExitGPTModel in one process: pipeline splits equal the unsplit model, zero-weight exits change
nothing, KV-cached decoding equals a full forward, recompute changes no number, keys and init."""

import re

import pytest
import torch

from megatron.config import EarlyExitConfig
from megatron.core.distributed.finalize import reduce_tied_grads
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import model_parallel_seed
from megatron.core.transformer import InferenceParams
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import GPT, LLAMA
from megatron.testing.models import random_batch as data
from megatron.testing.models import split_config as cfg
from megatron.testing.models import split_model as build_split


def global_key(model, key):
    """Name of a chunk parameter in the unsplit (pp=1) model."""
    spec = model.spec
    m = re.match(r"language_model\.encoder\.layers\.(\d+)\.(.*)", key)
    if m:
        return f"language_model.encoder.layers.{spec.layers[int(m.group(1))] - 1}.{m.group(2)}"
    m = re.match(r"language_model\.exit_output_layer\.(\d+)\.(.*)", key)
    if m:
        k = list(model.partition.exit_layers).index(spec.exits[int(m.group(1))])
        return f"language_model.exit_output_layer.{k}.{m.group(2)}"
    return {"word_embeddings_for_head.weight": "language_model.embedding.word_embeddings.weight",
            "output_layer_for_exits.weight": "language_model.output_layer.weight"}.get(key, key)


def run_chunks(models, ids, labels, weights=None):
    """Chunks in model order, hidden handed on; loss = mean final + sum_i w_i mean exit_i."""
    h, loss, exit_losses = None, 0.0, {}
    for m in models:
        out = m(ids, labels=labels) if m.spec.has_embedding else m(hidden_states=h, labels=labels)
        exit_losses.update(out.exit_losses)
        h = out.output
    for layer, l in exit_losses.items():
        loss = loss + (1.0 if weights is None else weights[layer]) * l.mean()
    return loss + h.mean(), h, exit_losses


EE_VARIANTS = [
    dict(),
    dict(use_exit_norm=True),
    dict(use_exit_norm=True, use_exit_mlp=True),
    dict(use_exit_norm=True, use_exit_block=True, untie_exit_output_weights=True),
    dict(use_exit_mlp=True, use_exit_block=True, use_dynamic_exit_layer_weight=True),
    dict(pre_exit=True, use_exit_block=True, exit_layer_temperature=[0.5, 2.0, 1.0]),
    dict(pre_exit=True, untie_exit_output_weights=True),
    dict(use_exit_linear=True, use_exit_block=True, use_exit_norm=True, exit_estimator=True),
]


SPLITS = [(GPT, 4, 1, None), (GPT, 3, 1, [2, 2, 0]), (GPT, 2, 2, None),
          (LLAMA, 2, 1, [3, 1]), (LLAMA, 4, 1, [1, 2, 1, 0]), (LLAMA, 2, 2, None)]


@pytest.mark.parametrize("arch,pp,vpp,lps", SPLITS, ids=[f"{'gpt' if a is GPT else 'llama'}-pp{p}-vpp{v}-{l}"
                                                         for a, p, v, l in SPLITS])
def test_split_equals_unsplit(arch, pp, vpp, lps):
    c = cfg(**arch)
    ids, labels = data()
    for variant in EE_VARIANTS:
        ee = EarlyExitConfig(exit_layer_nums=[1, 2, 4], exit_layer_weight=[0.3, 0.5, 0.2], **variant)
        (ref,) = build_split(c, ee, 1)
        chunks = build_split(c, ee, pp, vpp, lps)
        ref_params = dict(ref.named_parameters())
        for m in chunks:
            for k, p in m.named_parameters():
                assert torch.equal(p, ref_params[global_key(m, k)]), (variant, k)
        w = dict(zip(ee.exit_layer_nums, ee.weights))
        loss_ref, out_ref, exits_ref = run_chunks([ref], ids, labels, w)
        loss, out, exits = run_chunks(chunks, ids, labels, w)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
        assert exits.keys() == exits_ref.keys() == set(ee.exit_layer_nums)
        for layer in exits:
            torch.testing.assert_close(exits[layer], exits_ref[layer], rtol=0, atol=1e-6)
        loss_ref.backward()
        loss.backward()
        reduce_tied_grads(chunks, None, attr="grad")  # one process holds every copy: no group
        seen = set()
        for m in chunks:
            for k, p in m.named_parameters():
                g = global_key(m, k)
                seen.add(g)
                torch.testing.assert_close(p.grad, ref_params[g].grad, rtol=1e-5, atol=1e-7, msg=f"{variant} {k}")
        assert seen == set(ref_params)


@pytest.mark.parametrize("arch", [GPT, LLAMA], ids=["gpt", "llama"])
def test_zero_weight_exits_change_nothing(arch):
    c = cfg(**arch)
    ids, labels = data()
    plain = EarlyExitGPTModel(c, None, state=ParallelState.single())
    plain_out = plain(ids, labels=labels).output
    plain_out.mean().backward()
    plain_params = dict(plain.named_parameters())
    for variant in EE_VARIANTS:
        ee = EarlyExitConfig(exit_layer_nums=[1, 3, 4], **variant)
        m = EarlyExitGPTModel(c, ee, state=ParallelState.single())
        loss, out, exits = run_chunks([m], ids, labels, {layer: 0.0 for layer in ee.exit_layer_nums})
        torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
        loss.backward()
        for k, p in m.named_parameters():
            k_plain = k.replace("mlp.trunk.", "mlp.")
            if k_plain in plain_params:
                assert torch.equal(p, plain_params[k_plain]), k
                torch.testing.assert_close(p.grad, plain_params[k_plain].grad, rtol=0, atol=0)
            else:  # exit-only parameter
                assert p.grad is None or not p.grad.any(), k


def test_recompute_changes_nothing():
    ids, labels = data()
    ee = EarlyExitConfig(exit_layer_nums=[1, 2, 4], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True)
    results = []
    for rc in (dict(), dict(recompute_granularity="selective"),
               dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
               dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3)):
        c = cfg(hidden_dropout=0.2, attention_dropout=0.2, **LLAMA, **rc)
        st = ParallelState.single()
        tracker = model_parallel_seed(11, st)
        m = EarlyExitGPTModel(c, ee, state=st, rng_tracker=tracker)
        m.train()
        loss, _, _ = run_chunks([m], ids, labels)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    m.eval()
    with torch.no_grad():
        no_dropout, _, _ = run_chunks([m], ids, labels)
    assert abs(no_dropout.item() - results[0][0].item()) > 1e-3  # dropout really was active
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for k, g in grads.items():
            torch.testing.assert_close(g, results[0][1][k], rtol=1e-6, atol=1e-8, msg=k)


def test_explicit_mask_equals_causal():
    m = EarlyExitGPTModel(cfg(**LLAMA), EarlyExitConfig(exit_layer_nums=[2]), state=ParallelState.single())
    ids, labels = data()
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1)[None, None]  # Megatron: True = masked out
    a, b = m(ids, labels=labels), m(ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(b.output, a.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.exit_losses[2], a.exit_losses[2], rtol=0, atol=1e-6)
    padded = mask | torch.tensor([True, False] + [False] * 6)[None, None, None]  # key 0 hidden as padding
    assert not torch.allclose(m(ids, labels=labels, attention_mask=padded).output[:, 1:], a.output[:, 1:])


def _full_logits(m, ids):
    out = m(ids)
    return out.output, out.exit_logits


def _logits(view):
    """A head view's logits per sequence ``[b, n, vocab]``."""
    return view.per_sequence(view.logits())


@pytest.mark.parametrize("arch", [GPT, LLAMA], ids=["gpt", "llama"])
def test_kv_cached_decoding_equals_full_forward(arch):
    c = cfg(**arch)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_block=True, use_exit_norm=True)
    m = EarlyExitGPTModel(c, ee, state=ParallelState.single()).eval()
    ids, _ = data(b=3, s=12)
    with torch.no_grad():
        full, full_exits = _full_logits(m, ids)
    ip = InferenceParams(max_batch_size=4, max_sequence_length=16)
    # prompt of 5, then 3 tokens at once (as KV recomputation feeds), then one at a time
    v = c.vocab_size
    for start, end in ((0, 5), (5, 8), (8, 9), (9, 10), (10, 12)):
        out = m.infer(ids[:, start:end], inference_params=ip, exits=(1, 3))
        torch.testing.assert_close(_logits(out.final), full[:, start:end, :v], rtol=1e-5, atol=1e-5)
        for layer in (1, 3):
            torch.testing.assert_close(_logits(out.exits[layer]), full_exits[layer][:, start:end, :v], rtol=1e-5,
                                       atol=1e-5)
        ip.sequence_len_offset = end
    # a sub-batch addressed by cache rows: rows 2 and 0 re-fed at positions 10..11
    ip.sequence_len_offset, ip.batch_idx = 10, torch.tensor([2, 0])
    out = m.infer(ids[[2, 0], 10:12], inference_params=ip, num_last=1)
    torch.testing.assert_close(_logits(out.final), full[[2, 0], 11:12, :v], rtol=1e-5, atol=1e-5)


def test_inference_exit_decisions_per_sequence():
    c = cfg(**LLAMA)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3])
    m = EarlyExitGPTModel(c, ee, state=ParallelState.single()).eval()
    ids, _ = data(b=3, s=6)
    with torch.no_grad():
        full, full_exits = _full_logits(m, ids)
    calls = []

    def decide_some(view):  # sequence 0 exits at layer 1, sequence 2 at layer 3
        calls.append(view.layer)
        return torch.tensor([view.layer == 1, False, view.layer == 3])

    v = c.vocab_size
    out = m.infer(ids, inference_params=InferenceParams(3, 8), exits=(1, 3), decider=decide_some, num_last=1)
    assert not out.stopped and calls == [1, 3]
    assert out.exited.tolist() == [True, False, True] and out.exit_layer.tolist() == [1, 0, 3]
    torch.testing.assert_close(_logits(out.final), full[:, -1:, :v], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(out.exits[1]), full_exits[1][:, -1:, :v], rtol=1e-5, atol=1e-5)

    out = m.infer(ids, inference_params=InferenceParams(3, 8), exits=(1, 3), num_last=1,
                  decider=lambda view: torch.ones(3, dtype=bool))
    assert out.stopped and out.final is None and out.exit_layer.tolist() == [1, 1, 1]
    assert list(out.exits) == [1]


def test_state_dict_keys_and_tied_copies():
    c = cfg(**GPT)
    ee = EarlyExitConfig(exit_layer_nums=[2, 3])
    chunks = build_split(c, ee, 4)
    keys = [set(m.state_dict()) for m in chunks]
    assert "language_model.embedding.word_embeddings.weight" in keys[0]
    assert "word_embeddings_for_head.weight" in keys[1] and "word_embeddings_for_head.weight" in keys[2]
    assert "word_embeddings_for_head.weight" in keys[3] and "language_model.encoder.final_norm.weight" in keys[3]
    assert chunks[1].tied_stages() == {"word_embeddings": [0, 1, 2, 3]}
    untied = build_split(cfg(**LLAMA), ee, 4)
    assert "output_layer_for_exits.weight" in untied[1].state_dict()
    assert "language_model.output_layer.weight" in untied[3].state_dict()
    assert untied[0].tied_parameters() == {} and untied[0].tied_stages() == {"output_layer": [1, 2, 3]}
    ee_untied = EarlyExitConfig(exit_layer_nums=[2, 3], untie_exit_output_weights=True)
    sd = build_split(cfg(**LLAMA), ee_untied, 2)[1].state_dict()
    assert "language_model.exit_output_layer.0.weight" in sd and "output_layer_for_exits.weight" not in sd
    assert sd["language_model.encoder.layers.0.self_attention.query_key_value.weight"].shape == (2 * 4 * 8, 32)
    assert sd["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (96, 32)


@pytest.mark.parametrize("arch", [GPT, LLAMA], ids=["gpt", "llama"])
def test_skip_init_draws_nothing_and_a_load_gives_the_model(monkeypatch, arch):
    """``initialize="skip"`` (a checkpoint is loaded right after) draws no weight and builds the same
    parameters; loading a drawn model's state dict makes it that model."""
    from megatron.core.transformer import initialization

    c, ee = cfg(**arch), EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True, use_exit_norm=True)
    drawn = EarlyExitGPTModel(c, ee, state=ParallelState.single()).eval()

    def no_draws(*args):
        raise AssertionError("a weight was drawn")

    monkeypatch.setattr(initialization, "derive_seed", no_draws)
    skipped = EarlyExitGPTModel(c, ee, state=ParallelState.single(), initialize="skip").eval()
    want, got = drawn.state_dict(), skipped.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in want.items()] == [(k, v.shape, v.dtype) for k, v in got.items()]
    skipped.load_state_dict(want, strict=True)
    ids, labels = data()
    torch.testing.assert_close(skipped(input_ids=ids, labels=labels).output, drawn(input_ids=ids, labels=labels).output,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="initialize"):
        EarlyExitGPTModel(c, ee, state=ParallelState.single(), initialize="lazy")


def test_training_skips_the_init_only_when_a_checkpoint_will_load(tmp_path):
    from types import SimpleNamespace

    from megatron.training.setup import _initialization

    def run_cfg(load, load_iteration=0):
        return SimpleNamespace(checkpoint=SimpleNamespace(load=load, load_iteration=load_iteration))

    assert _initialization(run_cfg(None)) is True
    assert _initialization(run_cfg(str(tmp_path))) is True  # --load without a checkpoint: start from scratch
    assert _initialization(run_cfg(str(tmp_path), load_iteration=3)) == "skip"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    assert _initialization(run_cfg(str(tmp_path))) == "skip"


@pytest.mark.parametrize("tp", [2, 4])
def test_seeded_init_is_layout_independent_on_the_model_device(tp):
    """Every tp rank draws the full weight on the layer's device and keeps its shard: the shards of any tp
    put back together are the tp = 1 weight (row- and column-parallel, stride 2 for SwiGLU)."""
    from megatron.core import tensor_parallel as tpl
    from megatron.core.parallel_state import ParallelDims
    from megatron.core.transformer import SeededInit

    recipe = SeededInit(seed=3, std=0.02, num_layers=2)

    def layers(state):
        col = tpl.ColumnParallelLinear(8, 16, state=state, stride=2, init_method=recipe.normal(1, "h_to_4h"))
        row = tpl.RowParallelLinear(16, 8, state=state, init_method=recipe.scaled(1, "4h_to_h"))
        return col.weight.detach(), row.weight.detach()

    col1, row1 = layers(ParallelState.single())
    shards = [layers(ParallelState(dims=ParallelDims(tp=tp), rank=r)) for r in range(tp)]
    torch.testing.assert_close(tpl.unshard_tensors([s[0] for s in shards], 0, 2), col1, rtol=0, atol=0)
    torch.testing.assert_close(tpl.unshard_tensors([s[1] for s in shards], 1), row1, rtol=0, atol=0)
    assert abs(row1.std().item() - 0.02 / 2) < 0.005


def test_use_cpu_initialization_reaches_the_model_recipe():
    """--use-cpu-initialization (a GPU run starting from a CPU run's weights): the flag reaches the model
    config and the recipe draws on the CPU, which on a CPU weight is the plain draw."""
    from megatron.arguments import parse_args, resolve
    from megatron.core.transformer import SeededInit

    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
             "--max-position-embeddings", "8", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1",
             "--mock-data", "--vocab-size", "64", "--device", "cpu"]
    for extra, want in (([], False), (["--use-cpu-initialization"], True)):
        assert resolve(parse_args(flags + extra), 1, vocab_size=64).model.use_cpu_initialization is want
    a, b = torch.empty(5, 3), torch.empty(5, 3)
    SeededInit(1, 0.02, 2).normal(1, "w")(a)
    SeededInit(1, 0.02, 2, on_cpu=True).normal(1, "w")(b)
    assert torch.equal(a, b)
