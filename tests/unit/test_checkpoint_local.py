"""Checkpoints in one process: layout, round trip of every state, tracker semantics, refusals and errors.

Ranks of other layouts are played in-process by ParallelState views (no groups): each writes or reads the
files of its own (tp, pp, dp) coordinate exactly as it would in a world.
"""

import argparse
import os
import random

import numpy as np
import pytest
import torch

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_args_from_checkpoint,
    load_checkpoint,
    read_tracker,
    save_checkpoint,
)

SINGLE = ParallelState.single()


class TinyScheduler:
    """Stand-in for the lr scheduler: a step counter and the lr it implies."""

    def __init__(self, optimizer):
        self.optimizer, self.num_steps = optimizer, 0

    def step(self, n=1):
        self.num_steps += n
        for g in self.optimizer.param_groups:
            g["lr"] = 0.1 / (1 + self.num_steps)

    def state_dict(self):
        return {"num_steps": self.num_steps}

    def load_state_dict(self, sd):
        self.num_steps = sd["num_steps"]


def _args(**kw):
    base = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, consumed_train_samples=0,
                consumed_valid_samples=0, num_layers=2, hidden_size=4)
    return argparse.Namespace(**{**base, **kw})


def _setup(seed, chunks=1):
    torch.manual_seed(seed)
    model = [torch.nn.Linear(4, 3) for _ in range(chunks)]
    opt = torch.optim.Adam([p for m in model for p in m.parameters()], lr=0.1)
    return model, opt, TinyScheduler(opt)


def _train(model, opt, sched, steps):
    for _ in range(steps):
        opt.zero_grad()
        sum(m(torch.randn(2, 4)).square().sum() for m in model).backward()
        opt.step()
        sched.step()


def _save(root, it, model, opt, sched, state=SINGLE, args=None, **kw):
    save_checkpoint(str(root), it, model, opt, sched, state, args or _args(), **kw)


def _load(root, model, opt, sched, state=SINGLE, args=None, **kw):
    return load_checkpoint(str(root), model, opt, sched, state, args or _args(), **kw)


def _draws(tracker):
    with tracker.fork():
        tp_draw = torch.rand(3)
    return random.random(), np.random.rand(), torch.rand(3), tp_draw


def _same_model(a, b):
    return all(torch.equal(x, y) for ma, mb in zip(a, b) for x, y in zip(ma.state_dict().values(),
                                                                           mb.state_dict().values()))


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 3)
    tracker = model_parallel_seed(7, SINGLE)
    random.seed(3)
    np.random.seed(3)
    args = _args(consumed_train_samples=96, num_floating_point_operations_so_far=1.5e9)
    _save(tmp_path, 3, model, opt, sched, args=args, rng_tracker=tracker)
    expected = _draws(tracker)
    _train(model, opt, sched, 1)
    after_one = [p.detach().clone() for p in model[0].parameters()]

    model2, opt2, sched2 = _setup(1)
    tracker2 = model_parallel_seed(99, SINGLE)
    random.seed(0)
    args2 = _args()
    assert _load(tmp_path, model2, opt2, sched2, args=args2, rng_tracker=tracker2) == 3
    got = _draws(tracker2)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    assert sched2.num_steps == 3 and args2.consumed_train_samples == 96
    assert args2.num_floating_point_operations_so_far == 1.5e9
    # Same RNG, weights and Adam moments: the next step lands on identical weights.
    _train(model2, opt2, sched2, 1)
    assert all(torch.equal(p, q) for p, q in zip(after_one, model2[0].parameters()))

    ckpt = torch.load(checkpoint_file(str(tmp_path), 3, 0, 0, 1), weights_only=False)
    assert set(ckpt) == {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler",
                         "rng_state", "num_floating_point_operations_so_far"}
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 3
    assert isinstance(ckpt["args"], argparse.Namespace) and isinstance(ckpt["rng_state"], list)
    assert os.path.isfile(tmp_path / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not [n for n in os.listdir(tmp_path / "iter_0000003" / "mp_rank_00") if n.endswith(".tmp")]


def test_virtual_pipeline_chunks_use_numbered_keys(tmp_path):
    model, opt, sched = _setup(0, chunks=2)
    _save(tmp_path, 1, model, opt, sched)
    ckpt = torch.load(checkpoint_file(str(tmp_path), 1, 0, 0, 1), weights_only=False)
    assert "model0" in ckpt and "model1" in ckpt and "model" not in ckpt
    model2, opt2, sched2 = _setup(1, chunks=2)
    assert _load(tmp_path, model2, opt2, sched2) == 1 and _same_model(model, model2)
    one, opt1, sched1 = _setup(1)
    with pytest.raises(CheckpointError, match="--num-layers-per-virtual-pipeline-stage"):
        _load(tmp_path, one, opt1, sched1, no_load_optim=True)


def test_tracker_latest_load_iteration_and_release(tmp_path):
    model, opt, sched = _setup(0)
    _save(tmp_path, 2, model, opt, sched)
    at_two = [p.detach().clone() for p in model[0].parameters()]
    _train(model, opt, sched, 2)
    _save(tmp_path, 4, model, opt, sched)
    assert read_tracker(str(tmp_path)) == (4, False)

    model2, opt2, sched2 = _setup(1)
    assert _load(tmp_path, model2, opt2, sched2) == 4 and _same_model(model, model2)
    assert _load(tmp_path, model2, opt2, sched2, load_iteration=2) == 2  # skips the tracker
    assert all(torch.equal(p, q) for p, q in zip(at_two, model2[0].parameters()))
    with pytest.raises(CheckpointError, match="--load-iteration 3"):
        _load(tmp_path, model2, opt2, sched2, load_iteration=3)

    os.rename(tmp_path / "iter_0000004", tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    model3, opt3, sched3 = _setup(1)
    assert _load(tmp_path, model3, opt3, sched3) == 0  # a release starts at iteration 0, model only
    assert _same_model(model, model3) and sched3.num_steps == 0 and not opt3.state


def test_missing_checkpoint_and_bad_tracker(tmp_path):
    model, opt, sched = _setup(0)
    assert _load(tmp_path / "nowhere", model, opt, sched) == 0
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint"):
        _load(tmp_path / "nowhere", model, opt, sched, exit_on_missing_checkpoint=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("banana")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt holds 'banana'"):
        _load(tmp_path, model, opt, sched)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12")
    with pytest.raises(CheckpointError, match="iter_0000012, which does not exist"):
        _load(tmp_path, model, opt, sched)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_named(tmp_path, damage):
    model, opt, sched = _setup(0)
    _save(tmp_path, 1, model, opt, sched)
    path = checkpoint_file(str(tmp_path), 1, 0, 0, 1)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match=f"{path} is truncated or corrupt"):
        _load(tmp_path, model, opt, sched)


def test_finetune_loads_the_model_only(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 2)
    _save(tmp_path, 2, model, opt, sched, args=_args(consumed_train_samples=64))
    model2, opt2, sched2 = _setup(1)
    args = _args()
    assert _load(tmp_path, model2, opt2, sched2, args=args, finetune=True) == 0
    assert _same_model(model, model2) and not opt2.state and sched2.num_steps == 0
    assert args.consumed_train_samples == 0


def test_optimizer_and_rng_omitted_at_save_need_the_no_load_flags(tmp_path):
    model, opt, sched = _setup(0)
    _save(tmp_path, 1, model, opt, sched, save_optim=False, save_rng=False)
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        _load(tmp_path, model, opt, sched, no_load_rng=True)
    with pytest.raises(CheckpointError, match="--no-load-rng"):
        _load(tmp_path, model, opt, sched, no_load_optim=True)
    assert _load(tmp_path, model, opt, sched, no_load_optim=True, no_load_rng=True) == 1


def _view(tp=1, pp=1, dp=1, rank=0):
    return ParallelState(dims=ParallelDims(tp=tp, pp=pp, dp=dp), rank=rank)


def _save_layout(root, tp, pp, dp, full_pp=None):
    models = {}
    for rank in range(tp * pp * dp):
        state = _view(tp, pp, dp, rank)
        model, opt, sched = _setup(state.tp_rank * 10 + state.pp_rank)
        _save(root, 5, model, opt, sched, state=state, args=_args(), full_pp=full_pp)
        models[(state.tp_rank, state.pp_rank)] = model
    return models


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_tp_or_pp_change_is_refused_with_the_reshard_tool(tmp_path, tp, pp):
    _save_layout(tmp_path, tp, pp, 1)
    model, opt, sched = _setup(0)
    with pytest.raises(CheckpointError, match=r"tools/checkpoint/util\.py.*--target-tensor-parallel-size 1 "
                                              r"--target-pipeline-parallel-size 1"):
        _load(tmp_path, model, opt, sched)
    # A rank whose own file exists also reads the stored sizes and refuses.
    with pytest.raises(CheckpointError, match=f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}"):
        _load(tmp_path, model, opt, sched, state=_view(tp=tp, pp=pp, rank=0), full_pp=2 * pp)


def test_data_parallel_change_loads(tmp_path):
    models = _save_layout(tmp_path, 1, 2, 2)
    assert not os.path.exists(tmp_path / "iter_0000005" / "mp_rank_00")  # pp > 1: suffixed names only
    for dp in (1, 3):
        for rank in range(2 * dp):
            state = _view(1, 2, dp, rank)
            model, opt, sched = _setup(42)
            assert _load(tmp_path, model, opt, sched, state=state) == 5
            assert _same_model(models[(0, state.pp_rank)], model) and sched.num_steps == 0


def test_partial_tuning_run_keeps_full_pipeline_names(tmp_path):
    model, opt, sched = _setup(0)
    _save(tmp_path, 1, model, opt, sched, full_pp=4)  # one stage of a 4-stage model runs
    assert os.path.isfile(tmp_path / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt")
    model2, opt2, sched2 = _setup(1)
    assert _load(tmp_path, model2, opt2, sched2, full_pp=4) == 1 and _same_model(model, model2)
    with pytest.raises(CheckpointError, match="--target-pipeline-parallel-size 1"):
        _load(tmp_path, model2, opt2, sched2)
    with pytest.raises(ValueError, match="full_pp"):
        _load(tmp_path, model2, opt2, sched2, state=_view(pp=2), full_pp=1)


def test_use_checkpoint_args_restores_model_and_exit_args(tmp_path):
    model, opt, sched = _setup(0)
    saved = _args(num_layers=6, hidden_size=32, exit_layer_nums=[2, 4], exit_layer_weight=[0.3, 0.5],
                  exit_layer_temperature=[0.7, 0.9], use_exit_norm=True, pre_exit=True, swiglu=True,
                  exit_layer_weight_warmup_iters=100)
    _save(tmp_path, 3, model, opt, sched, args=saved)
    args = argparse.Namespace(num_layers=None, hidden_size=64, exit_layer_nums=[], exit_layer_temperature=[],
                              use_exit_norm=False, exit_layer_weight_warmup_iters=0, swiglu=False)
    load_args_from_checkpoint(args, str(tmp_path))
    assert args.num_layers == 6 and args.hidden_size == 64  # unforced: only unset values are filled
    assert args.exit_layer_nums == [2, 4] and args.exit_layer_weight == [0.3, 0.5]
    assert args.exit_layer_temperature == [0.7, 0.9] and args.use_exit_norm and args.pre_exit and args.swiglu
    assert args.exit_layer_weight_warmup_iters == 0  # warm-up settings are the run's own
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint"):
        load_args_from_checkpoint(args, str(tmp_path / "nowhere"))


def test_distributed_optimizer_setting_must_match(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    _save(tmp_path, 1, model, opt, sched, args=_args(use_distributed_optimizer=True))
    assert os.path.isfile(tmp_path / "iter_0000001" / "mp_rank_00" / "distrib_optim.pt")
    with pytest.raises(CheckpointError, match="saved with --use-distributed-optimizer.*--no-load-optim"):
        _load(tmp_path, model, opt, sched)
    model2, opt2, sched2 = _setup(1)
    assert _load(tmp_path, model2, opt2, sched2, args=_args(use_distributed_optimizer=True)) == 1
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys() and sched2.num_steps == 1
