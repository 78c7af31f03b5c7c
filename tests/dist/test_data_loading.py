"""Data loading in a gloo world (tp=2, dp=2): the index cache is built by one rank while the others wait,
tp rank 0 reads and broadcasts its dp shard, and a restart at consumed samples k continues the run."""

import numpy as np
import torch.distributed as dist

from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.data.batch_utils import broadcast_data
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.indexed_dataset import write_dataset
from megatron.data.samplers import MegatronPretrainingSampler, build_pretraining_data_loader
from megatron.testing.distributed import run_distributed

MBS, SEQ, STEPS = 2, 8, 6


def _load(rank, world, prefix, consumed):
    state = ParallelState.build(ParallelDims.from_world(world, tp=2))
    train = build_train_valid_test_datasets([prefix], "100,0,0", [64, 0, 0], SEQ, 1234)[0]
    # Megatron builds datasets on tp rank 0 only: a builder group over those ranks must work too.
    tp0_ranks = list(range(0, world, 2))
    tp0_group = dist.new_group(tp0_ranks)
    built_by_tp0 = None
    if state.tp_rank == 0:
        other = build_train_valid_test_datasets([prefix], "100,0,0", [64, 0, 0], SEQ, 4321, group=tp0_group)[0]
        built_by_tp0 = other.index_built_here
    it = iter(build_pretraining_data_loader(train, consumed, MBS, state.dp_rank, state.dp)) if state.tp_rank == 0 \
        else None
    batches = []
    for _ in range(STEPS):
        data = next(it) if it is not None else None
        extra = {"text": data["text"], "step": np.full(3, len(batches))} if data is not None else None
        got = broadcast_data(["text", "step"], extra, state.tp_group, state.tp_ranks[0])
        assert got["step"].tolist() == [len(batches)] * 3
        batches.append(got["text"].tolist())
    return train.index_built_here, built_by_tp0, state.dp_rank, batches


def test_cache_built_once_broadcast_and_resume(tmp_path):
    rng = np.random.RandomState(0)
    prefix = str(tmp_path / "c_text_document")
    write_dataset(prefix, [rng.randint(0, 30000, size=rng.randint(1, 40)) for _ in range(60)], np.uint16)
    full = run_distributed(_load, 4, prefix, 0)
    assert [r[0] for r in full] == [True, False, False, False]
    assert [r[1] for r in full] == [True, None, False, None]
    reference = build_train_valid_test_datasets([prefix], "100,0,0", [64, 0, 0], SEQ, 1234)[0]
    for rank, (_, _, dp_rank, batches) in enumerate(full):
        sampler = iter(MegatronPretrainingSampler(len(reference), 0, MBS, dp_rank, 2))
        for batch in batches:  # tp peers got the same rows, and they are this dp rank's shard
            assert batch == [reference[i]["text"].tolist() for i in next(sampler)]
    k = 2 * MBS * 2  # restart after two global micro-batches
    resumed = run_distributed(_load, 4, prefix, k)
    for (_, _, _, a), (_, _, _, b) in zip(full, resumed):
        assert b[:STEPS - 2] == a[2:]
