"""Every message between pipeline stages during generation, typed in one place, with its float64 codec.

A step of any strategy moves, from stage ``s`` to ``s + 1``: a :class:`Header`, then (unless the header
ends the generation or reports a failure) the step's *payload* and, when the step runs there, the hidden
states ``[n, b, h]`` (params dtype). Its result reaches stage 0 as a *report*. Payloads and reports are
flat float64 tensors (float64 holds every token id, layer number and fp32/bf16 value exactly); the classes
here are the only code that knows their layout:

=============  =========================================  ============================================
mode           payload (down the pipeline)                report (to stage 0)
=============  =========================================  ============================================
MODE_GEN       :class:`Carry` (decisions, cosine state)   :class:`GenReport`
MODE_SCORE     :class:`Targets` (next tokens)             :class:`ScoreReport` (their log-probs)
MODE_BEAM      :class:`Parents` (beam of each row)        :class:`BeamReport` (top-k per row)
MODE_DRAFT     :class:`Fed` (token fed last, per row)     :class:`Drafts`
MODE_VERIFY    :class:`VerifyPayload` (fed, free)         :class:`VerdictReport`
=============  =========================================  ============================================

Every report starts with its status (:func:`pack_report`): OK, or FAILED with the failing stage, which
:func:`open_report` turns into a :class:`StageFailure` on stage 0 (see ``runner.py``).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

__all__ = [
    "RUN", "SKIP", "END", "FAILED", "MODE_GEN", "MODE_SCORE", "MODE_BEAM", "MODE_DRAFT", "MODE_VERIFY",
    "Header", "HEADER_LEN", "Carry", "GenReport", "Targets", "ScoreReport", "Parents", "BeamReport", "Fed", "Drafts",
    "VerifyPayload", "VerdictReport", "StageFailure", "pack_report", "failed_report", "open_report",
]

# header status: the step runs; every sequence exited upstream (method A: the rest of the pipeline skips the
# token); the generation is over; a stage failed this step (nothing follows the header)
RUN, SKIP, END, FAILED = 0, 1, 2, 3
MODE_GEN, MODE_SCORE, MODE_BEAM, MODE_DRAFT, MODE_VERIFY = 0, 1, 2, 3, 4


def _flat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(-1).double() for p in parts])


def _ids(t: torch.Tensor) -> torch.Tensor:
    return t.round().long()


@dataclass
class Header:
    """``n`` new positions written at KV ``offset``; ``step``: the step's index among the generated
    positions (the top-p decay, the decaying threshold and the random draws count by it); ``reorder``:
    reorder the KV rows by the payload's beam parents first; ``reported``: stage 0 has this step's result
    already (method B); ``force_full``: no stage may skip layers (``recompute_cap``); ``draft``: the number
    of drafted tokens a verify step checks; ``failed_at``: with status FAILED, the first stage that failed."""

    status: int = RUN
    mode: int = MODE_GEN
    n: int = 0
    offset: int = 0
    step: int = 0
    reorder: int = 0
    reported: int = 0
    force_full: int = 0
    draft: int = 0
    failed_at: int = -1

    def pack(self, device) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "Header":
        return cls(*(int(round(v)) for v in t.tolist()))


HEADER_LEN = len(astuple(Header()))


# ------------------------------------------------------------------------------------ MODE_GEN

class Carry:
    """Per-sequence decisions of one token-by-token step: ``exited`` (the token is settled), ``exit_layer``,
    ``token`` and its ``logprob``; and ``prev_hidden`` ``[b, h]``, the hidden state at the last computed exit
    for measures that compare with it (None before the step's first exit). Packs to ``[4 b]``, then with a
    ``hidden_size`` (the payload of a comparing measure) a presence flag and the states ``[1 + b h]``."""

    def __init__(self, exited: torch.Tensor, exit_layer: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor,
                 prev_hidden: torch.Tensor | None = None, hidden_size: int = 0):
        self.exited, self.exit_layer, self.token, self.logprob = exited, exit_layer, token, logprob
        self.prev_hidden, self.hidden_size = prev_hidden, hidden_size

    @classmethod
    def start(cls, decided: torch.Tensor, prev_token: torch.Tensor, hidden_size: int = 0) -> "Carry":
        """``decided``: sequences whose token is not needed this step (still in their prompt, or
        finished); ``prev_token``: the token fed last (for ``prevent_newline_after_colon``)."""
        b = decided.shape[0]
        return cls(decided.clone(), torch.zeros(b, dtype=torch.long, device=decided.device), prev_token.clone(),
                   torch.zeros(b, dtype=torch.float32, device=decided.device), hidden_size=hidden_size)

    @staticmethod
    def packed_len(b: int, hidden_size: int = 0) -> int:
        return 4 * b + (1 + b * hidden_size if hidden_size else 0)

    def pack(self, hidden_size: int | None = None) -> torch.Tensor:
        """``hidden_size``: the carry's own by default; 0: the decisions only (reports to stage 0)."""
        hidden_size = self.hidden_size if hidden_size is None else hidden_size
        parts = [self.exited, self.exit_layer, self.token, self.logprob]
        if hidden_size:
            device, b = self.exited.device, self.exited.shape[0]
            present = self.prev_hidden is not None
            states = self.prev_hidden if present else torch.zeros(b * hidden_size, dtype=torch.float64, device=device)
            parts += [torch.tensor([float(present)], device=device), states]
        return _flat(*parts)

    @classmethod
    def unpack(cls, t: torch.Tensor, hidden_size: int = 0) -> "Carry":
        b = (t.numel() - (1 if hidden_size else 0)) // (4 + hidden_size)
        e, layer, tok, lp = t[: 4 * b].view(4, b)
        prev = None
        if hidden_size and t[4 * b] > 0.5:
            prev = t[4 * b + 1:].view(b, hidden_size).float()
        return cls(e > 0.5, _ids(layer), _ids(tok), lp.float(), prev, hidden_size)


@dataclass
class GenReport:
    """``complete``: every sequence has its token (method B: the stage that completed the step);
    ``full_depth``: the step ran every layer (method A: the window's KV is complete); ``carry``: the
    decisions (method B's "continue" reports carry ``complete`` False)."""

    complete: bool
    full_depth: bool
    carry: Carry

    @staticmethod
    def size(b: int) -> int:
        return 2 + Carry.packed_len(b)

    def pack(self) -> torch.Tensor:
        flags = torch.tensor([float(self.complete), float(self.full_depth)], device=self.carry.exited.device)
        return torch.cat([flags.double(), self.carry.pack(0)])

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "GenReport":
        complete, full_depth = (v > 0.5 for v in t[:2].tolist())  # one host read for both flags
        return cls(complete, full_depth, Carry.unpack(t[2:]))



# ------------------------------------------------------------------------- scoring and beam search

@dataclass
class Targets:
    """The token after each fed position ``[b, n]``, whose log-prob a scoring step reports."""

    ids: torch.Tensor

    @staticmethod
    def size(b: int, n: int) -> int:
        return b * n

    def pack(self) -> torch.Tensor:
        return _flat(self.ids)

    @classmethod
    def unpack(cls, t: torch.Tensor, b: int) -> "Targets":
        return cls(_ids(t).view(b, -1))


@dataclass
class ScoreReport:
    logprobs: torch.Tensor  # [b, n]

    size = Targets.size

    def pack(self) -> torch.Tensor:
        return _flat(self.logprobs)

    @classmethod
    def unpack(cls, t: torch.Tensor, b: int) -> "ScoreReport":
        return cls(t.view(b, -1).float())


@dataclass
class _RowIds:
    """One id per row ``[b]``."""

    ids: torch.Tensor

    @staticmethod
    def size(b: int) -> int:
        return b

    def pack(self) -> torch.Tensor:
        return _flat(self.ids)

    @classmethod
    def unpack(cls, t: torch.Tensor):
        return cls(_ids(t))


class Parents(_RowIds):
    """Beam search: the old cache row each row continues (with ``Header.reorder``)."""


@dataclass
class BeamReport:
    """Each row's top ``k`` next-token log-probs and ids ``[b, k]``."""

    values: torch.Tensor
    indices: torch.Tensor

    @staticmethod
    def size(b: int, k: int) -> int:
        return 2 * b * k

    def pack(self) -> torch.Tensor:
        return _flat(self.values, self.indices)

    @classmethod
    def unpack(cls, t: torch.Tensor, b: int) -> "BeamReport":
        values, indices = t.view(2, b, -1)
        return cls(values, _ids(indices))


# ----------------------------------------------------------------------------------- speculative

class Fed(_RowIds):
    """A draft step's tokens fed last (for ``prevent_newline_after_colon``)."""


class Drafts(_RowIds):
    """The drafted token of each row."""


@dataclass
class VerifyPayload:
    """``fed`` ``[b, k + 1]``: the token before the drafts, then the drafts; ``free`` ``[b, k]``: the drafted
    positions whose token the model chooses (not a longer prompt's own token, not past the end)."""

    fed: torch.Tensor
    free: torch.Tensor

    @staticmethod
    def size(b: int, k: int) -> int:
        return b * (2 * k + 1)

    def pack(self) -> torch.Tensor:
        return _flat(self.fed, self.free)

    @classmethod
    def unpack(cls, t: torch.Tensor, b: int, k: int) -> "VerifyPayload":
        return cls(_ids(t[: b * (k + 1)]).view(b, k + 1), t[b * (k + 1):].view(b, k) > 0.5)


@dataclass
class VerdictReport:
    """The verification's commit: ``accepted`` (``m``) and, per position ``[b, k + 1]``, the committed
    tokens, their log-probs and whether each is the fed token (see ``acceptance.Verdict``)."""

    accepted: int
    tokens: torch.Tensor
    logprobs: torch.Tensor
    from_draft: torch.Tensor

    @staticmethod
    def size(b: int, k: int) -> int:
        return 1 + 3 * b * (k + 1)

    def pack(self) -> torch.Tensor:
        m = torch.tensor([float(self.accepted)], device=self.tokens.device)
        return _flat(m, self.tokens, self.logprobs, self.from_draft)

    @classmethod
    def unpack(cls, t: torch.Tensor, b: int) -> "VerdictReport":
        tokens, logprobs, from_draft = t[1:].view(3, b, -1)
        return cls(int(round(float(t[0]))), _ids(tokens), logprobs.float(), from_draft > 0.5)


# ----------------------------------------------------------------------------------- report status

class StageFailure(RuntimeError):
    """A pipeline stage failed during a generation step (its traceback is in that rank's log)."""

    def __init__(self, stage: int):
        super().__init__(f"pipeline stage {stage} failed during generation (see that rank's log for the traceback)")
        self.stage = stage


def pack_report(body: torch.Tensor) -> torch.Tensor:
    """A report ``[status OK, body]`` (``body``: a message's ``pack()``)."""
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=body.device), body.double()])


def failed_report(size: int, stage: int, device) -> torch.Tensor:
    """The report of a failed step, as long as the one expected (``size``: the body's)."""
    t = torch.zeros(1 + size, dtype=torch.float64, device=device)
    t[0], t[1] = 1.0, float(stage)
    return t


def open_report(t: torch.Tensor) -> torch.Tensor:
    """The body of a report; a FAILED one raises :class:`StageFailure`."""
    if t[0] > 0.5:
        raise StageFailure(int(round(float(t[1]))))
    return t[1:]
