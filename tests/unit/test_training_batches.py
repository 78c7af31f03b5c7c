"""The step's microbatches as the training loop hands them to the schedule (issue 14, item 10): every
microbatch's token ids are read up front in id order, but its model inputs -- with
--reset-attention-mask a [b, 1, s, s] mask -- are built only when a forward asks for it, and not kept."""

import gc
import weakref
from types import SimpleNamespace

import torch

from megatron.core.parallel_state import ParallelState
from megatron.training import loop

EOD = 9


def _reference(text):
    """Document-separated inputs written out naively: a token attends to earlier tokens of its document."""
    tokens = text[:, :-1]
    b, s = tokens.shape
    doc = torch.zeros(b, s, dtype=torch.long)
    doc[:, 1:] = (tokens[:, :-1] == EOD).long().cumsum(dim=1)
    q, k = torch.arange(s).view(s, 1), torch.arange(s).view(1, s)
    allowed = (k <= q) & (doc.unsqueeze(2) == doc.unsqueeze(1))
    start = torch.stack([torch.stack([(doc[r, :t] != doc[r, t]).sum() for t in range(s)]) for r in range(b)])
    return {"tokens": tokens, "labels": text[:, 1:], "loss_mask": (tokens != EOD).float(),
            "attention_mask": ~allowed.unsqueeze(1), "position_ids": torch.arange(s) - start}


def test_masks_are_built_per_microbatch_when_consumed(monkeypatch):
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 12, (2, 17), generator=g) for _ in range(4)]
    flags = SimpleNamespace(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    model = SimpleNamespace(padded_vocab=lambda tp: 16)  # read_text checks the ids against it
    run = SimpleNamespace(state=ParallelState.single(), eod=EOD, cfg=SimpleNamespace(data=flags, model=model))
    built = []
    real = loop.model_inputs
    monkeypatch.setattr(loop, "model_inputs", lambda text, *a: built.append(text) or real(text, *a))
    data = iter([{"text": t} for t in texts])

    batch = loop._batches(run, data, 4)
    assert next(data, None) is None, "the step's token ids are read up front"
    assert built == [], "no mask may exist before a forward asks for its microbatch"
    for mb in (2, 0, 3, 1):  # any order the schedule consumes them in
        got = batch(mb)
        assert len(built) == 1 and torch.equal(built[-1], texts[mb])
        built.clear()
        want = _reference(texts[mb])
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (mb, key)
        assert got["attention_mask"].dtype == torch.bool and got["attention_mask"].shape == (2, 1, 16, 16)
        mask = weakref.ref(got["attention_mask"])
        del got
        gc.collect()
        assert mask() is None, "the step must not keep a consumed microbatch's mask"
