"""The inference forward of one EarlyExitGPTModel chunk: a range of layers, exits consulted through lazy views.

Every decoding strategy (token-by-token with exits by KV recomputation or pipelining, self-speculative
drafting and verification, beam search) and the evaluation scorer run the model through this one call,
:meth:`EarlyExitGPTModel.infer` (:func:`inference_forward`); none of them touches the encoder's layers.

- ``layers=(lo, hi)`` runs the layers numbered ``lo < l <= hi`` of this chunk (``None``: all of them). The
  input is the output of layer ``lo``: ``input_ids`` are embedded when the chunk owns the embedding and the
  range starts at 0, else ``hidden_states`` ``[n, b, h]`` are taken (e.g. a speculative verification resumes
  at the draft exit). The final norm and head apply when the range reaches the model's last layer.
- ``exits``: the exit layers to compute. Every other exit of the range skips its own work (exit MLP branch,
  exit block, exit norm): an exit nobody consults costs nothing. Each computed exit yields a
  :class:`HeadView` of the ``num_last`` positions (default all): its hidden state is computed, its
  vocabulary projection only when :meth:`HeadView.logits` is first called (then cached), so a decision rule
  that needs no logits (CALM's cosine, a learned estimator on the hidden state) pays for the projection
  only where it fires. An exit block still runs on every fed position: its KV cache must stay complete.
- ``decider(view) -> fires [b] bool | None`` is asked at each computed exit in layer order (``num_last``
  must be 1: it decides on each sequence's last position). Sequences that fire are recorded (``exited``,
  ``exit_layer``, accumulated over chunks); with ``stop_when_decided`` the layer loop stops once every
  sequence has exited (KV recomputation: deeper layers get no KV for these positions and the strategy
  re-feeds them later to back-fill), without it every layer runs (pipelined early exit, a capped window).
- ``inference_params=None`` runs without a KV cache (a whole causal sequence: teacher-forced scoring).

Exit logits are never tempered here (EE-LLM's inference): a rule applies a temperature itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from megatron.core.tensor_parallel import gather_full_tensor, linear

from .exit_heads import EarlyExitTransformerLayer, full_vocab_logits, lm_logits

__all__ = ["HeadView", "InferenceOutput", "ExitDecider", "head_projection", "inference_forward"]


class HeadView:
    """What one output head (an exit, or the final head) sees of the positions asked, as rows.

    ``layer``: the exit's layer number (``num_layers`` for the final head). ``batch``, ``positions``: the
    rows are ``batch * positions``, sequence-major (row ``i * positions + j`` is sequence ``i``'s ``j``-th
    position asked). ``hidden`` ``[rows, h]``: the state the head projects (after the exit block / norm,
    or the final norm). :meth:`logits` ``[rows, vocab]`` (float32, the real vocabulary: padding cut, the
    full vocabulary gathered over tensor parallelism) is computed on first use and cached.
    ``chunk``: the model chunk owning the head (a learned estimator reads its parameters there).
    ``trunk`` ``[rows, h]``: an exit's trunk state, what its learned estimator reads (the exit layer's output,
    or its input for a pre-exit, before any exit part; None for the final head)."""

    __slots__ = ("layer", "batch", "positions", "chunk", "_hidden_sbh", "_hidden", "_project", "_logits", "_trunk_sbh")

    def __init__(self, layer: int, hidden_sbh: torch.Tensor | None,
                 project: Callable[[torch.Tensor], torch.Tensor] | None, *, chunk=None, logits: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None, trunk_sbh: torch.Tensor | None = None):
        self.layer, self.chunk = layer, chunk
        self._hidden_sbh, self._project = hidden_sbh, project
        self._hidden, self._logits = hidden, logits
        self._trunk_sbh = trunk_sbh
        if hidden_sbh is not None:
            self.positions, self.batch = hidden_sbh.shape[0], hidden_sbh.shape[1]
        else:
            rows = (logits if logits is not None else hidden).shape[0]
            self.positions, self.batch = 1, rows

    @classmethod
    def of(cls, layer: int, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> "HeadView":
        """A view over given rows (``logits`` ``[m, V]`` and/or ``hidden`` ``[m, h]``), e.g. in tests."""
        return cls(layer, None, None, logits=logits, hidden=hidden)

    @property
    def rows(self) -> int:
        return self.batch * self.positions

    @property
    def hidden(self) -> torch.Tensor:
        if self._hidden is None:
            if self._hidden_sbh is None:
                raise ValueError(f"the view of layer {self.layer} carries no hidden state")
            h = self._hidden_sbh
            self._hidden = h[0] if self.positions == 1 else h.transpose(0, 1).reshape(self.rows, h.shape[-1])
        return self._hidden

    @property
    def trunk(self) -> torch.Tensor | None:
        t = self._trunk_sbh
        if t is None:
            return None
        return t[0] if self.positions == 1 else t.transpose(0, 1).reshape(self.rows, t.shape[-1])

    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self._project is None:
                raise ValueError(f"the view of layer {self.layer} carries no head to project with")
            self._logits = self._project(self._hidden_sbh)
        return self._logits

    def computed(self) -> bool:
        """Whether the vocabulary projection has run (for tests and cost accounting)."""
        return self._logits is not None

    def derive(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> "HeadView":
        """The same head with ``transform(logits)`` as its logits, still computed lazily (once)."""
        view = HeadView.__new__(HeadView)
        for name in HeadView.__slots__:
            setattr(view, name, getattr(self, name))
        view._project, view._logits = (lambda _: transform(self.logits())), None
        return view

    def per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``[rows, ...]`` -> ``[batch, positions, ...]``."""
        return x.view(self.batch, self.positions, *x.shape[1:])


ExitDecider = Callable[[HeadView], Optional[torch.Tensor]]


@dataclass
class InferenceOutput:
    """``hidden`` ``[n, b, h]``: the output of the last layer run (the next chunk's input; with a range ending
    inside the chunk, e.g. a speculative draft, that layer's output); None when ``stopped``. ``final``: the
    final head's view (the range reached the model's end on the head chunk, and not ``stopped``).
    ``exits``: the view of every computed exit reached. ``exited`` ``[b]`` bool and ``exit_layer`` ``[b]``
    (0: none) accumulate over chunks (pass them on to the next chunk). ``stopped``: every sequence exited
    and the rest of the range was skipped (later chunks need not run)."""

    hidden: Optional[torch.Tensor]
    final: Optional[HeadView]
    exited: torch.Tensor
    exit_layer: torch.Tensor
    stopped: bool = False
    exits: dict[int, HeadView] = field(default_factory=dict)


def _range(model, layers: tuple[int, int] | None) -> tuple[int, int]:
    if layers is None:
        return 0, model.config.num_layers
    lo, hi = layers
    if not 0 <= lo <= hi <= model.config.num_layers:
        raise ValueError(f"layers ({lo}, {hi}): need 0 <= lo <= hi <= num_layers ({model.config.num_layers})")
    return lo, hi


def head_projection(model, exit_layer: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The vocabulary projection of exit ``exit_layer`` (None: the final head): ``[n, b, h]`` -> logits of
    the real vocabulary as rows ``[b n, V]`` (float32, gathered over tensor parallelism). The one place a
    head's logits are computed at inference.

    An exit of a model with a filled exit vocabulary (``exit_vocab``, ``--exit-vocab-size K``) projects onto
    those ``K`` token ids only (the rows of its output weight for them, gathered once): the other ids get
    ``-inf``, so every measure and token choice downstream sees the exit's distribution over its vocabulary.
    On SmolLM2-135M with K = 16384 an exit check costs ~2 layers instead of ~6 (``tools/measure_exits.py``)."""
    group, vocab = model.state.tp_group, model.config.vocab_size
    weight = model.output_weight() if exit_layer is None else model.exit_weight(exit_layer)
    reduced = exit_layer is not None and _has_exit_vocabulary(model)

    @torch.no_grad()  # called lazily, after the forward returned
    def project(h: torch.Tensor) -> torch.Tensor:
        if reduced:
            ids, rows = _exit_vocab_rows(model, weight)
            x = h.transpose(0, 1).reshape(-1, h.shape[-1])
            out = torch.full((x.shape[0], vocab), float("-inf"), dtype=torch.float32, device=x.device)
            out[:, ids] = linear(x, rows).float()
            return out
        logits = full_vocab_logits(lm_logits(h, weight, group, False), group)  # [b, n, V_padded]
        return logits.reshape(-1, logits.shape[-1])[:, :vocab].float()

    return project


def _has_exit_vocabulary(model) -> bool:
    ids = getattr(model, "exit_vocab", None)
    return ids is not None and ids.numel() > 0 and not bool((ids < 0).any())


def _exit_vocab_rows(model, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the exit vocabulary's ids ``[K]``, the rows of ``weight`` for them ``[K, h]``): the vocab-parallel
    weight is gathered once and the rows kept, until the weight or the ids change."""
    ids = model.exit_vocabulary()
    key = (weight.data_ptr(), weight._version, ids.data_ptr(), ids._version)
    cache = model.__dict__.setdefault("_exit_vocab_rows", {})
    if cache.get(id(weight), (None,))[0] != key:
        full = gather_full_tensor(weight, weight, model.state)  # collective over tp: every rank calls it
        cache[id(weight)] = (key, ids, full[ids].contiguous())
    _, ids, rows = cache[id(weight)]
    return ids, rows


def _last(x: torch.Tensor, num_last: int | None) -> torch.Tensor:
    return x if num_last is None else x[-num_last:]


def _start(model, lo: int, input_ids, hidden_states, position_ids, offset: int):
    embed = model.spec.has_embedding and lo == 0
    if embed and input_ids is None:
        raise ValueError("the first chunk needs input_ids for a range starting at layer 0")
    if not embed and hidden_states is None:
        raise ValueError(f"layers from {lo + 1} on chunk (stage {model.spec.stage}, chunk {model.spec.chunk}) need "
                         f"hidden_states (the output of layer {lo})")
    return model.stage_input(input_ids if embed else None, position_ids, None if embed else hidden_states,
                             offset=offset)


def inference_forward(model, input_ids=None, *, inference_params, hidden_states=None, position_ids=None,
                      attention_mask=None, layers: tuple[int, int] | None = None, num_last: int | None = None,
                      exits: Iterable[int] = (), decider: ExitDecider | None = None, stop_when_decided: bool = True,
                      exited: torch.Tensor | None = None, exit_layer: torch.Tensor | None = None) -> InferenceOutput:
    """Feed ``n`` new positions (``input_ids`` ``[b, n]`` or ``hidden_states`` ``[n, b, h]``) at
    ``inference_params.sequence_len_offset`` through ``layers``; see the module doc."""
    if model.sequence_parallel:
        raise ValueError("inference runs without --sequence-parallel; build the inference model with it off")
    if decider is not None and num_last != 1:
        raise ValueError("an exit decider decides on each sequence's last position: pass num_last=1")
    lo, hi = _range(model, layers)
    wanted = set(exits)
    offset = 0 if inference_params is None else inference_params.sequence_len_offset
    with torch.no_grad():
        h, _, rope = _start(model, lo, input_ids, hidden_states, position_ids, offset)
        b = h.shape[1]
        exited = torch.zeros(b, dtype=torch.bool, device=h.device) if exited is None else exited.clone()
        exit_layer = torch.zeros(b, dtype=torch.long, device=h.device) if exit_layer is None else exit_layer.clone()
        out = InferenceOutput(None, None, exited, exit_layer)
        # a host-side flag: once every sequence has decided, no decider is asked again
        deciding = decider is not None and not bool(exited.all())
        for layer in model.language_model.encoder.layers:
            number = layer.layer_number
            if not lo < number <= hi:
                continue
            if not isinstance(layer, EarlyExitTransformerLayer):
                h = layer(h, attention_mask, rope, inference_params)
                continue
            want = number in wanted
            h_in = h
            h, h_exit = layer(h, attention_mask, rope, inference_params, with_exit=want, exit_last=num_last)
            if not want:
                continue
            trunk = _last(layer.trunk_state(h_in, h), num_last)
            view = out.exits[number] = HeadView(number, h_exit, head_projection(model, number), chunk=model,
                                                trunk_sbh=trunk)
            fire = decider(view) if deciding else None
            if fire is None:
                continue
            fire = fire.to(torch.bool) & ~out.exited
            out.exit_layer = torch.where(fire, number, out.exit_layer)
            out.exited = out.exited | fire
            deciding = not bool(out.exited.all())
            if not deciding and stop_when_decided:
                out.stopped = True
                return out
        out.hidden = h
        if model.spec.has_head and hi == model.config.num_layers:
            normed = model.language_model.encoder.final_norm(h if num_last is None else h[-num_last:])
            out.final = HeadView(model.config.num_layers, normed, head_projection(model, None), chunk=model)
        return out
