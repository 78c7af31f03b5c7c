"""How good each exit is, judged against the model itself, and what early exit would gain with it.

The measure of an exit is its **teacher-forced agreement** with the final head: on a text (best, the
model's own continuations of prompts unlike its tuning data), the share of positions where the exit's
top-1 token equals the final head's, the full prefix given. Early-exit decoding with an exit can only
emit the model's own token where they agree, so agreement bounds the fidelity of everything built on it.

- :func:`exit_predictions` runs one process's model over token sequences (a full-sequence causal forward,
  every exit and the final head at once) and keeps, for the positions asked, each exit's top-1 token and
  its confidence (the top-1 probability, over the exit vocabulary when one is given) and the final
  head's top-1: an :class:`ExitPredictions`.
- :func:`calibration` bins a confidence against agreement (does "0.8 sure" mean 80 % agreement?).
- :class:`DecodeCosts` are the measured costs of one decoding step on this machine: a transformer layer,
  the final head, an exit check (the exit's projection), in seconds per token.
- :func:`project` replays the early-exit rule "leave at the first exit whose confidence reaches the
  threshold" over the predictions with those costs: the projected speed-up over full depth and the
  fidelity (share of tokens equal to the full model's choice). The skipped layers' KV back-fill of a
  later step is taken as free: on these machines a layer's matrix products cost the same for 1 to 3
  rows (see ``bench/README.md``), so the next full-depth step carries it. :func:`recommend` searches the
  exit subsets and thresholds for the fastest projection above a fidelity floor.

Projections are a model of decoding, not a measurement of it: ``bench/bench_smollm2.py`` measures real
decoding side by side with full depth.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

__all__ = ["ExitPredictions", "exit_predictions", "calibration", "DecodeCosts", "measure_costs", "Projection",
           "project", "recommend"]


@dataclass
class ExitPredictions:
    """Over ``n`` measured positions: ``final`` ``[n]`` the final head's top-1; per exit layer, ``top1``
    ``[n]`` the exit's top-1 token and ``confidence`` ``[n]`` its top-1 probability; ``estimate`` ``[n]``
    the exit's learned agreement estimate where the model has one."""

    final: torch.Tensor
    top1: dict[int, torch.Tensor] = field(default_factory=dict)
    confidence: dict[int, torch.Tensor] = field(default_factory=dict)
    estimate: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def exits(self) -> list[int]:
        return sorted(self.top1)

    def agree(self, layer: int) -> torch.Tensor:
        return self.top1[layer] == self.final

    def agreement(self, layer: int) -> float:
        return float(self.agree(layer).float().mean()) if len(self.final) else float("nan")


def _top1(logits: torch.Tensor, vocab: int, exit_vocab: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits[..., :vocab].float()
    if exit_vocab is not None:
        p = torch.softmax(x[..., exit_vocab], dim=-1)
        conf, idx = p.max(dim=-1)
        return exit_vocab[idx], conf
    p = torch.softmax(x, dim=-1)
    conf, idx = p.max(dim=-1)
    return idx, conf


@torch.no_grad()
def exit_predictions(model, sequences: list[list[int]], starts: list[int] | None = None, *,
                     exit_vocab: torch.Tensor | None = None, estimator=None) -> ExitPredictions:
    """Teacher-forced predictions of every exit of a one-process ``model`` (an
    :class:`~megatron.model.EarlyExitGPTModel` holding the whole network) over ``sequences``: for each
    sequence the positions from ``starts[i]`` on (default 0) predict the following token.
    ``exit_vocab``: token ids the exits choose among (their reduced-vocabulary projection); ``estimator``:
    ``estimator(layer, hidden [rows, h]) -> [rows]`` agreement estimates (a model's learned estimator)."""
    spec = model.spec
    if not (spec.has_embedding and spec.has_head):
        raise ValueError("exit_predictions needs the whole model in one process (tp = pp = 1): reshard the "
                         "checkpoint with tools/checkpoint/util.py --target-tensor-parallel-size 1 "
                         "--target-pipeline-parallel-size 1")
    was_training = model.training
    model.eval()
    vocab = model.config.vocab_size
    out = ExitPredictions(final=torch.zeros(0, dtype=torch.long))
    finals, tops, confs, ests = [], {}, {}, {}
    hooks = _capture_layer_outputs(model) if estimator is not None else None
    try:
        for i, seq in enumerate(sequences):
            start = 0 if starts is None else starts[i]
            if len(seq) < 2 or start >= len(seq) - 1:
                continue
            ids = torch.tensor([seq[:-1]], dtype=torch.long, device=model.state.device)
            res = model(input_ids=ids)
            finals.append(res.output[0, start:].float()[..., :vocab].argmax(-1).cpu())
            for layer, logits in res.exit_logits.items():
                top, conf = _top1(logits[0, start:], vocab, exit_vocab)
                tops.setdefault(layer, []).append(top.cpu())
                confs.setdefault(layer, []).append(conf.cpu())
                if hooks is not None:
                    ests.setdefault(layer, []).append(estimator(layer, hooks.pop(layer)[start:, 0]).float().cpu())
    finally:
        if hooks is not None:
            hooks.remove()
        model.train(was_training)
    if finals:
        out.final = torch.cat(finals)
        out.top1 = {k: torch.cat(v) for k, v in tops.items()}
        out.confidence = {k: torch.cat(v) for k, v in confs.items()}
        out.estimate = {k: torch.cat(v) for k, v in ests.items()}
    return out


class _capture_layer_outputs(dict):
    """Keeps each exit layer's output ``[s, b, h]`` of the last forward (what an estimator reads)."""

    def __init__(self, model):
        super().__init__()
        from megatron.model.exit_heads import EarlyExitTransformerLayer

        self._handles = []
        for layer in model.language_model.encoder.layers:
            if isinstance(layer, EarlyExitTransformerLayer):
                number = layer.layer_number

                def hook(module, args, output, number=number):
                    self[number] = module.trunk_state(args[0], output[0]).detach()

                self._handles.append(layer.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def calibration(confidence: torch.Tensor, agree: torch.Tensor, bins: int = 10) -> dict:
    """Reliability of a confidence in [0, 1]: per equal-width bin the count, the mean confidence and the
    agreement rate; ``ece``: the count-weighted mean gap between the two."""
    edges = torch.linspace(0, 1, bins + 1)
    rows, gap, n = [], 0.0, max(len(confidence), 1)
    idx = torch.clamp((confidence * bins).long(), max=bins - 1)
    for b in range(bins):
        sel = idx == b
        count = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count}
        if count:
            row["mean_confidence"] = float(confidence[sel].mean())
            row["agreement"] = float(agree[sel].float().mean())
            gap += count * abs(row["mean_confidence"] - row["agreement"])
        rows.append(row)
    return {"bins": rows, "ece": gap / n}


@dataclass
class DecodeCosts:
    """Seconds per decoded token on this machine: one transformer layer, the final head, one exit check
    (the exit's vocabulary projection and softmax) and an exit's agreement estimator."""

    layer_s: float
    head_s: float
    check_s: float
    estimator_s: float = 0.0

    def as_layers(self) -> dict:
        return {"head": self.head_s / self.layer_s, "check": self.check_s / self.layer_s,
                "estimator": self.estimator_s / self.layer_s}


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure_costs(model, *, context: int = 128, exit_vocab_size: int | None = None, estimator_layer: int | None = None,
                  repeats: int = 15) -> DecodeCosts:
    """Time one token's cached forward at depth (after ``context`` cached positions), the head's projection,
    an exit check (a projection onto ``exit_vocab_size`` rows, default the whole vocabulary) and, with
    ``estimator_layer``, that exit's learned estimator, on this machine (the caller sets the torch threads
    it decodes with)."""
    from megatron.core.transformer import InferenceParams

    weight = model.output_weight()
    h = weight.new_zeros(1, weight.shape[1]).normal_()
    rows = weight if not exit_vocab_size else weight[:exit_vocab_size].clone()
    head_s = _median_time(lambda: torch.softmax(torch.nn.functional.linear(h, weight), -1), repeats)
    check_s = _median_time(lambda: torch.softmax(torch.nn.functional.linear(h, rows), -1), repeats)
    estimator_s = 0.0
    if estimator_layer is not None:
        estimator_s = _median_time(lambda: torch.sigmoid(model.exit_estimate(estimator_layer, h)), repeats)
    context = max(1, min(context, model.config.max_positions - 1))  # learned positions bound the context
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), device=weight.device)
    kv = InferenceParams(1, context + 1)

    def step():
        kv.sequence_len_offset = context
        model.infer(ids[:, context:], inference_params=kv, num_last=1)

    model.infer(ids[:, :context], inference_params=kv, num_last=1)
    full_s = _median_time(step, repeats)
    layer_s = max(full_s - head_s, 1e-9) / model.config.num_layers
    return DecodeCosts(layer_s=layer_s, head_s=head_s, check_s=check_s, estimator_s=estimator_s)


@dataclass
class Projection:
    exits: tuple[int, ...]
    threshold: float
    speedup: float
    fidelity: float
    share: dict[int, float]  # tokens leaving at each exit (the rest run full depth)
    estimator_floor: float | None = None


def project(preds: ExitPredictions, exits, threshold: float, costs: DecodeCosts, num_layers: int,
            estimator_floor: float | None = None) -> Projection:
    """Replay "leave at the first of ``exits`` whose confidence reaches ``threshold``" over ``preds``.
    With ``estimator_floor``, an exit's check (its projection) runs only where its learned estimate
    reaches the floor. Costs: every exit reached pays its estimator (when used) and, where checked, its
    check; a token leaving at layer ``L`` pays ``L`` layers; the others pay full depth and the head."""
    n = len(preds.final)
    exits = tuple(sorted(exits))
    if n == 0:
        return Projection(exits, threshold, float("nan"), float("nan"), {})
    full = num_layers * costs.layer_s + costs.head_s
    cost = torch.zeros(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    token = preds.final.clone()
    share = {}
    for layer in exits:
        live = ~done
        checked = live
        if estimator_floor is not None and layer in preds.estimate:
            cost[live] += costs.estimator_s
            checked = live & (preds.estimate[layer] >= estimator_floor)
        cost[checked] += costs.check_s
        fire = checked & (preds.confidence[layer] >= threshold)
        cost[fire] += layer * costs.layer_s
        token[fire] = preds.top1[layer][fire]
        share[layer] = float(fire.float().mean())
        done |= fire
    cost[~done] += full
    return Projection(exits, threshold, full / float(cost.mean()), float((token == preds.final).float().mean()),
                      share, estimator_floor)


def recommend(preds: ExitPredictions, costs: DecodeCosts, num_layers: int, *, min_fidelity: float = 0.9,
              thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), floors=(None,), max_exits: int = 3) -> Projection | None:
    """The fastest projection with fidelity >= ``min_fidelity`` over every subset of at most
    ``max_exits`` exits, each threshold and estimator floor (None: no estimator)."""
    best = None
    for k in range(1, max_exits + 1):
        for subset in itertools.combinations(preds.exits, k):
            for thr in thresholds:
                for floor in floors:
                    p = project(preds, subset, thr, costs, num_layers, floor)
                    if p.fidelity >= min_fidelity and (best is None or p.speedup > best.speedup):
                        best = p
    return best
