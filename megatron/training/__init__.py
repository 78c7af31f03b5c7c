"""Training: the typed run configuration (``config``), set-up (``setup``), the loop and evaluation
(``loop``, ``training``), one pipeline step (``forward_backward``), a run's checkpoint wiring (``resume``;
the files themselves are :mod:`megatron.checkpoint`'s), logging (``logging_utils``, ``metrics``,
``trackers``) and the SIGTERM handler (``signal_handler``)."""

from megatron.training.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    configs_from_args,
    optimal_fill_microbatches,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "LoggingConfig", "ParallelConfig", "RunConfig", "TrainingConfig",
    "configs_from_args", "optimal_fill_microbatches",
]
