"""Evaluation of early-exit models: an lm-evaluation-harness ``LM`` adapter (:mod:`.adapter`) over
teacher-forced exit / threshold scoring (:mod:`.scoring`) and ``generate``, local task files and their
metrics (:mod:`.tasks`), and the command-line runner (``python -m megatron.evaluation``)."""

from .adapter import HAVE_LM_EVAL, EarlyExitLM, Request
from .scoring import ExitScorer
from .tasks import Task, load_task, run_task

__all__ = ["EarlyExitLM", "Request", "HAVE_LM_EVAL", "ExitScorer", "Task", "load_task", "run_task"]
