"""Training: the typed run configuration (``config``); the loop, evaluation, logging and checkpointing
modules join this package as they land."""

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
