"""Early-exit decisions and per-sequence token choice inside one token-by-token decoding step.

:func:`exit_rule` turns a request's early-exit parameters into the shared :class:`~..exit_rule.ExitRule`
(which exits may fire, which are computed, the confidence measure, the threshold and its CALM decay).
:class:`TokenPicker` is the decider the model's inference forward consults at every computed exit: it
walks the rule over the step's sequences (per sequence: EE-LLM decided the whole batch from its last
one) and, for those that leave, takes the token from that exit's logits; the final head decides the
rest. It reads an exit's logits only when a confidence measure or a token choice needs them.

The two decoding methods differ only in what the forward does when every sequence has decided:
- method A, KV recomputation (``RECOMPUTE``): the forward stops, deeper layers get no KV for this
  position, and the next step re-feeds every position since the last full-depth pass to back-fill it.
  ``recompute_cap`` bounds that window (EE-LLM's grew without limit): after that many skipping steps
  the next step runs every layer while still taking each token from its exit, so tokens never change;
- method B, pipeline-based (``PIPELINE``): no stage skips; the stage where every sequence has decided
  sends the tokens to stage 0 at once, which starts the next token while later stages finish this one.
"""

from __future__ import annotations

import torch

from ..exit_rule import ExitRule, ExitWalk
from ..messages import Carry
from ..sampling import SAMPLE, is_greedy, select_tokens, token_logprobs

__all__ = ["RECOMPUTE", "PIPELINE", "resolve_method", "exit_rule", "TokenPicker"]

RECOMPUTE, PIPELINE = "recompute", "pipeline"


def resolve_method(ee_params, pp: int) -> str:
    """``auto`` -> pipeline-based when pp > 1, else KV recomputation."""
    method = ee_params.method
    if method == "auto":
        return PIPELINE if pp > 1 else RECOMPUTE
    if method not in (RECOMPUTE, PIPELINE):
        raise ValueError(f"early_exit.method must be 'auto', 'recompute' or 'pipeline', got {method!r}")
    return method


def exit_rule(ee_params, ee_config) -> ExitRule | None:
    """The request's rule (checked, naming the field), or None when the request does not exit early."""
    if ee_params.recompute_cap is not None and ee_params.recompute_cap < 1:
        raise ValueError(f"early_exit.recompute_cap must be >= 1 (or None: unbounded), got {ee_params.recompute_cap}")
    exits = list(ee_config.exit_layer_nums)
    temperature = ee_config.temperature if ee_params.use_temperature else None
    rule = ExitRule(exits, allowed=ee_params.exit_layers, measure=ee_params.confidence,
                    threshold=ee_params.early_exit_thres, decay=ee_params.threshold_decay, temperature=temperature,
                    estimator_floor=ee_params.estimator_floor)
    return rule if ee_params.use_early_exit and exits else None


class TokenPicker:
    """Fills a step's :class:`Carry` from exit views and the final head's view (the last position of each
    sequence). ``rule``: None without early exit; ``draws``: the request's :class:`~..sampling.Draws`;
    ``newline_ban``: (newline id, bool ``[vocab]`` of the ids ending with ':') or None; ``report``:
    ``print_max_prob``'s callback(layer, tokens, probs); ``lags`` ``[b]``: each prompt's length minus the
    shortest one's (step ``s`` generates token ``s - lag`` of a sequence), for the decaying threshold."""

    def __init__(self, rule: ExitRule | None, sampling, draws, *, num_layers: int, newline_ban=None, report=None,
                 lags: torch.Tensor | None = None):
        self.rule, self.sampling, self.draws, self.num_layers = rule, sampling, draws, num_layers
        self.newline_ban, self.report, self.lags = newline_ban, report, lags
        self.greedy = is_greedy(sampling)
        self.carry: Carry | None = None
        self.walk: ExitWalk | None = None
        self.step = 0
        self._u: torch.Tensor | None = None

    def begin(self, carry: Carry, step: int) -> None:
        self.carry, self.step, self._u = carry, step, None
        if self.rule is not None:
            self.walk = ExitWalk(self.rule, carry.exited, carry.prev_hidden, self._bar(carry.exited))

    def _bar(self, decided: torch.Tensor):
        b, device = decided.shape[0], decided.device
        lags = self.lags.to(device) if self.lags is not None else torch.zeros(b, dtype=torch.long, device=device)
        # sequences still in their prompt (negative index) are decided already; clamp keeps CALM's formula valid
        return self.rule.bar((self.step - lags).clamp(min=0), self.sampling.tokens_to_generate)

    def _ban(self, logits: torch.Tensor) -> torch.Tensor:
        newline, colons = self.newline_ban
        after_colon = colons.to(logits.device)[self.carry.token]
        banned = logits.clone()
        banned[:, newline] = banned[:, newline].masked_fill(after_colon, float("-inf"))
        return banned

    def _view(self, view):
        return view if self.newline_ban is None else view.derive(self._ban)

    def _take(self, rows: torch.Tensor, view, layer: int) -> None:
        """Rows ``rows`` take their token from ``view``'s logits (computed for every row: cheaper than
        gathering the rows, and no host sync)."""
        x = view.logits()
        if self._u is None and not self.greedy:
            seqs = torch.arange(x.shape[0], device=x.device)
            self._u = self.draws.uniform(SAMPLE, seqs, self.step)
        tokens = select_tokens(x, self.sampling, self.step, self._u)
        c = self.carry
        c.token = torch.where(rows, tokens, c.token)
        c.logprob = torch.where(rows, token_logprobs(x, tokens), c.logprob)
        c.exit_layer = torch.where(rows, layer, c.exit_layer)
        c.exited = c.exited | rows

    def decide(self, view) -> torch.Tensor | None:
        """The exit decider of :func:`megatron.model.inference.inference_forward` -> fires ``[b]`` or None."""
        view = self._view(view)
        fire = self.walk.visit(view)
        self.carry.prev_hidden = self.walk.prev_hidden
        if self.report is not None and self.walk.last_confidence is not None:
            self.report(view.layer, view.logits().argmax(-1), self.walk.last_confidence)
        if fire is None or not bool(fire.any()):  # nothing leaves: the logits stay uncomputed
            return None
        self._take(fire, view, view.layer)
        return fire

    def final(self, view) -> None:
        """The final head decides every sequence still open."""
        rows = ~self.carry.exited
        if not bool(rows.any()):
            return
        view = self._view(view)
        if self.report is not None:
            x = view.logits()
            self.report(self.num_layers, x.argmax(-1), torch.softmax(x, dim=-1).max(dim=-1).values)
        self._take(rows, view, self.num_layers)
