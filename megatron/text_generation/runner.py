"""The step protocol every decoding strategy follows, with its recovery from failures.

A :class:`StageRunner` holds one generation's per-rank state (this rank's KV cache) and a strategy's
step (subclasses: ``strategies/``). Stage 0 calls :meth:`StageRunner.drive` once per step and gets the
step's report back; every other stage calls :meth:`StageRunner.serve`, which follows stage 0's headers
until END (see ``messages.py`` for what travels). Every rank sets its KV offset from the header, so all
layers of every stage agree on what is cached.

Failures. An exception in a step must not leave a rank waiting for a message that never comes:
- on stage 0 (its step or its loop), ``generation._run`` ends the generation with
  :meth:`finish` (END), the other stages return from :meth:`serve`, and stage 0 broadcasts the failure;
- on a later stage, the step's messages are still answered: the stage stage 0 waits on for this step sends a
  FAILED report in place of its report (:meth:`reports_here`), any other stage passes a FAILED header on
  towards it; a stage that failed stays failed for the rest of the generation (its cache is incomplete)
  and answers every later step the same way. Stage 0 raises :class:`~.messages.StageFailure` on the FAILED
  report and ends the generation as above. A failure on a stage whose result stage 0 never waits for
  (method B, downstream of a stage where every sequence decided) is logged there and changes no token.
Every runner is built per generation, so the next request starts from a clean state on every rank.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from .messages import END, FAILED, Header, failed_report, open_report, pack_report

__all__ = ["Step", "StageRunner"]

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One stage's result of a step: the header, payload and hidden states for the next stage, and the
    report for stage 0 (None: this stage reports nothing). Payload and report are the typed messages of
    ``messages.py``; they are packed only to cross a process boundary."""

    header: Header
    payload: object
    hidden: torch.Tensor | None
    report: object = None


class StageRunner(ABC):
    """Subclasses implement :meth:`step` and the message sizes; the rest of the protocol lives here."""

    def __init__(self, eng, batch: int, max_len: int):
        self.eng, self.b = eng, batch
        self.kv = eng.new_cache(batch, max_len)
        self.observer = None  # observer(runner, header) after every step on this stage (tests)
        self.failed_at: int | None = None  # the first failed stage this stage knows of (None: healthy)
        self.ended = False

    # ------------------------------------------------------------------ the strategy's part
    @abstractmethod
    def step(self, header: Header, payload, ids=None, hidden=None) -> Step:
        """This stage's work of one step (``ids`` on stage 0, else ``hidden`` unless the step skips here)."""

    @abstractmethod
    def payload_len(self, header: Header) -> int:
        """The packed size of the step's payload."""

    @abstractmethod
    def read_payload(self, header: Header, t: torch.Tensor):
        """The step's payload message from its packed form."""

    @abstractmethod
    def report_len(self, header: Header) -> int:
        """The packed size of the report body stage 0 expects for this step."""

    @abstractmethod
    def read_report(self, header: Header, t: torch.Tensor):
        """The step's report message from its packed body."""

    def hidden_len(self, header: Header) -> int:
        """Positions of the hidden states this stage receives."""
        return header.n

    def ends_here(self, header: Header) -> bool:
        """The step goes no further down the pipeline than this stage."""
        return self.eng.is_last

    def reports_here(self, header: Header) -> bool:
        """Stage 0 waits for this stage's report on this step (stages > 0)."""
        return self.ends_here(header)

    def report_sources(self, header: Header) -> list[int]:
        """Stage 0: the stages whose reports it reads, in order, until one :meth:`completes` the step."""
        return [self.eng.state.pp - 1]

    def completes(self, header: Header, report) -> bool:
        return True

    def before_step(self, header: Header) -> None:
        """Stages > 0: receive what travels outside the header chain (before the failure check)."""

    def after_send(self, header: Header) -> None:
        """After the step went down the pipeline: send what travels outside the header chain."""

    # ------------------------------------------------------------------ stage 0
    def drive(self, header: Header, payload, ids: torch.Tensor):
        """Stage 0: run the step here, pass it down, and return the step's report message."""
        step = self._run(header, payload, ids=ids)
        if not self.ends_here(header):
            self.eng.send_down(step.header, step.payload.pack(), step.hidden)
            self.after_send(step.header)
        if step.report is not None and self.completes(header, step.report):
            return step.report
        size = self.report_len(header)
        for stage in self.report_sources(header):
            report = self.read_report(header, open_report(self.eng.recv_report(stage, 1 + size)))
            if self.completes(header, report):
                return report
        raise RuntimeError("no pipeline stage completed the step")  # the last source always does

    def finish(self) -> None:
        """Stage 0: tell the other stages that generation is over (idempotent)."""
        if not self.ended and not self.eng.is_last:
            self.eng.send_down(Header(status=END))
        self.ended = True

    # ------------------------------------------------------------------ stages > 0
    def serve(self) -> None:
        """Stages > 0: run steps until stage 0 sends END."""
        while True:
            header, payload, hidden = self.eng.recv_down(self.payload_len, self.b, self.hidden_len)
            if header.status == END:
                self.finish()
                return
            self.before_step(header)
            if header.status == FAILED:  # failed upstream in this step
                self._answer_failed(header, header.failed_at)
                continue
            if self.failed_at is not None:  # failed in an earlier step: this step fails here
                self._answer_failed(header, self.eng.stage)
                continue
            try:
                step = self._run(header, self.read_payload(header, payload), hidden=hidden)
            except Exception:  # noqa: BLE001 -- answered below; stage 0 raises it for the request
                log.exception("pipeline stage %d: generation step failed", self.eng.stage)
                self._answer_failed(header, self.eng.stage)
                continue
            if step.report is not None:  # report before passing down: stage 0 may start the next step sooner
                self.eng.report(pack_report(step.report.pack()))
            if not self.ends_here(header):
                self.eng.send_down(step.header, step.payload.pack(), step.hidden)
                self.after_send(step.header)

    def _answer_failed(self, header: Header, failed_at: int) -> None:
        """``failed_at``: the first stage where this step failed (what travels on tells the stages below
        what was sent in this step: ``SpeculativeRunner.before_step``)."""
        if self.failed_at is None:
            self.failed_at = failed_at
        if self.reports_here(header):
            self.eng.report(failed_report(self.report_len(header), failed_at, self.eng.device))
        elif not self.ends_here(header):
            self.eng.send_down(replace(header, status=FAILED, failed_at=failed_at))

    # ------------------------------------------------------------------ both
    def _run(self, header: Header, payload, ids=None, hidden=None) -> Step:
        self.kv.sequence_len_offset = header.offset
        step = self.step(header, payload, ids=ids, hidden=hidden)
        if self.observer is not None:
            self.observer(self, header)
        return step
