"""Experiment trackers: TensorBoard (``--tensorboard-dir``) and Weights & Biases (``--wandb-project``).

Both are optional imports: a missing package gives one warning and the run goes on without that
tracker. They are written by the one rank that prints the console line, after the losses of every
stage have been gathered, so one run (not one per stage, as EE-LLM's W&B) holds every exit's curves.
Keys are EE-LLM's (``train/lm loss``, ``train/early loss [L]``, ``train/exit weight [L]``, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from megatron.run_config import LoggingConfig

__all__ = ["Trackers", "build_trackers"]

log = logging.getLogger(__name__)


class _WandbWriter:
    def __init__(self, run):
        self.run = run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to writers with TensorBoard's ``add_scalar(tag, value, step)`` / ``close()``."""

    def __init__(self, writers: list | None = None):
        self.writers = list(writers or [])

    def __bool__(self) -> bool:
        return bool(self.writers)

    def log(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _tensorboard(cfg: LoggingConfig):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("--tensorboard-dir %s given but tensorboard is not installed (pip install tensorboard); "
                    "not writing TensorBoard logs", cfg.tensorboard_dir)
        return None
    return SummaryWriter(log_dir=cfg.tensorboard_dir, max_queue=cfg.tensorboard_queue_size)


def _wandb(cfg: LoggingConfig, save_dir: str | None, config: dict):
    try:
        import wandb
    except ImportError:
        log.warning("--wandb-project %s given but wandb is not installed (pip install wandb); not logging to W&B",
                    cfg.wandb_project)
        return None
    directory = cfg.wandb_save_dir or (os.path.join(save_dir, "wandb") if save_dir else "./wandb")
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group, name=cfg.wandb_exp_name, dir=directory,
                     notes=os.environ.get("RUN_DESCRIPTION"), config=config)
    return _WandbWriter(run)


def build_trackers(cfg: LoggingConfig, save_dir: str | None = None, config: dict | None = None,
                   active: bool = True) -> Trackers:
    """The trackers the flags ask for (none on ranks where ``active`` is False)."""
    writers = []
    if active and cfg.tensorboard_dir:
        writers.append(_tensorboard(cfg))
    if active and cfg.wandb_project:
        writers.append(_wandb(cfg, save_dir, config or {}))
    return Trackers([w for w in writers if w is not None])
