"""GPT / Llama models with early exits, stage partitioning and exit-weight schedules."""

from .early_exit_gpt_model import EarlyExitGPTModel, StageOutput, tied_weight_holders
from .exit_weights import exit_weight, exit_weights
from .inference import InferenceOutput, inference_forward
from .partition import ChunkSpec, Partition, partition

__all__ = [
    "EarlyExitGPTModel",
    "StageOutput",
    "tied_weight_holders",
    "exit_weight",
    "exit_weights",
    "InferenceOutput",
    "inference_forward",
    "ChunkSpec",
    "Partition",
    "partition",
]
