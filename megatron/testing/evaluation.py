"""The evaluation tests' pieces: a tiny random early-exit model (:data:`NUM_LAYERS` = 4 layers, exits
:data:`EXITS`, NullTokenizer with :data:`VOCAB` ids) and its lm-eval adapter (:func:`make_lm`, also split
into pipeline stages in one process or built on a rank's ``ParallelState``), the same model's command-line
flags (:data:`MODEL_FLAGS`), the hand-written 5-item multiple-choice task (:data:`TASK`,
:func:`write_task`), and oracles computed from the plain full forward (:func:`full_logprobs`,
:func:`continuation_logprob`, :func:`greedy_oracle`)."""

from __future__ import annotations

import json

import torch

from megatron.config import EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.evaluation import EarlyExitLM
from megatron.model import EarlyExitGPTModel, partition
from megatron.testing.models import tiny_config
from megatron.tokenizer.null import NullTokenizer

VOCAB = 40  # NullTokenizer: ids 0..39 plus eod 40
EXITS = (1, 3)
NUM_LAYERS = 4
MODEL_FLAGS = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
               "--exit-layer-nums 1 3 --device cpu --tokenizer-type NullTokenizer --vocab-size 40 --random-weights").split()

TASK = [
    {"context": "1 2 3", "choices": [" 4", " 5", " 6"], "gold": 0},
    {"context": "7 8", "choices": [" 9 10", " 11"], "gold": 1},
    {"context": "3 3 3", "choices": [" 3", " 4 4 4"], "gold": 0},
    {"context": "10 20 30", "choices": [" 31", " 2", " 17"], "gold": 2},
    {"context": "5", "choices": [" 6 7", " 8 9", " 1"], "gold": 1},
]


def configs(max_positions=16):
    """The model, its exits and the tokenizer."""
    tok = NullTokenizer(VOCAB)
    model = tiny_config(None, num_layers=NUM_LAYERS, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=16,
                        seq_length=max_positions, max_position_embeddings=max_positions, seed=11,
                        untie_embeddings_and_output_weights=True)
    return model, EarlyExitConfig(exit_layer_nums=list(EXITS), use_exit_norm=True), tok


def chunks(state=None, pp_in_process=1, max_positions=16):
    """The model of this rank (one chunk), or all ``pp_in_process`` stages built in one process."""
    model, ee, tok = configs(max_positions)
    if pp_in_process == 1:
        st = state or ParallelState.single()
        return [EarlyExitGPTModel(model, ee, state=st).eval()], st, model, ee, tok
    part = partition(model.num_layers, pp_in_process, 1, ee.exit_layer_nums)
    st = ParallelState.single()
    built = [EarlyExitGPTModel(model, ee, state=st, partition=part, stage=s.stage).eval() for s in part.all_specs()]
    return built, st, model, ee, tok


def make_lm(state=None, pp_in_process=1, max_positions=16, **kw):
    """The ``EarlyExitLM`` over :func:`chunks`; ``kw`` go to the adapter (e.g. ``exit_layer``)."""
    built, st, model, ee, tok = chunks(state, pp_in_process, max_positions)
    return EarlyExitLM(built, st, tok, model, ee, **kw)


def write_task(path):
    """Write :data:`TASK` as a JSON-lines task file at ``path``; its path as a string."""
    path.write_text("".join(json.dumps(item) + "\n" for item in TASK))
    return str(path)


def full_logprobs(lm, ids, layer=None):
    """Oracle: log-softmax over the real vocabulary of the model's own training forward (no labels) on
    ``ids`` ``[s]``, at the final head or at exit ``layer`` -> ``[s, vocab]``."""
    (model,) = lm.chunks
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    logits = out.output if layer is None else out.exit_logits[layer]
    return torch.log_softmax(logits[0, :, : lm.model_config.vocab_size].float(), dim=-1)


def continuation_logprob(lm, context, continuation, layer=None):
    """Oracle: sum of the continuation's log-probs and whether each is the argmax."""
    seq = context + continuation
    lp = full_logprobs(lm, seq[:-1], layer)
    rows = lp[len(context) - 1:]
    target = torch.tensor(continuation)
    total = float(rows.gather(-1, target.unsqueeze(-1)).sum())
    return total, bool((rows.argmax(-1) == target).all())


def greedy_oracle(lm, ids, steps, layer=None):
    """Oracle greedy decoding by full forwards: argmax over the real vocabulary, stopping at eod."""
    ids, out = list(ids), []
    for _ in range(steps):
        token = int(full_logprobs(lm, ids, layer)[-1].argmax())
        out.append(token)
        if token == lm.tokenizer.eod:
            break
        ids.append(token)
    return out
