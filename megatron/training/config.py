"""Training-side configuration sections and :class:`RunConfig`, the typed form of a whole run.

``configs_from_args(args)`` turns a parsed (and derived, see ``megatron.arguments.validate_args``)
Namespace into sections; core code takes these sections, never the Namespace. Field names are the
Megatron / EE-LLM ``args`` attribute names (so a checkpoint's ``args`` maps one to one, and
``RunConfig.to_args`` gives that Namespace back), except :class:`ParallelConfig`, which uses the short
axis names ``tp`` / ``pp`` / ``dp`` / ``vpp``.

Sections: :class:`~megatron.config.ModelConfig` and :class:`~megatron.config.EarlyExitConfig` (model),
:class:`~megatron.optimizer.config.OptimizerConfig` (optimizer, lr / weight-decay schedule and mixed
precision: one section, owned by the optimizer package), and here :class:`ParallelConfig`,
:class:`TrainingConfig`, :class:`DataConfig`, :class:`CheckpointConfig`, :class:`LoggingConfig`.
Every ``validate`` raises :class:`~megatron.config.ConfigError` naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelConfigError, ParallelDims
from megatron.model.partition import Partition, partition
from megatron.optimizer.config import OptimizerConfig

__all__ = [
    "ParallelConfig", "TrainingConfig", "DataConfig", "CheckpointConfig", "LoggingConfig", "RunConfig",
    "configs_from_args", "optimal_fill_microbatches",
]

DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def optimal_fill_microbatches(pp: int, backward_forward_ratio: float) -> int:
    """EE-LLM's bound on fill microbatches per phase: ``int((pp - 1) * R / (1 + R))`` (truncated)."""
    return int((pp - 1) * backward_forward_ratio / (1.0 + backward_forward_ratio))


@dataclass
class ParallelConfig:
    """Parallel layout. ``pp`` stages partition the model; ``run_pp`` of them are built and run (fewer
    only in EE-Tuning with ``--tune-exit-pipeline-parallel-size``); ``dp = world / (tp * run_pp)``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None  # model chunks per stage (--num-layers-per-virtual-pipeline-stage)
    run_pp: int | None = None  # None: pp
    sequence_parallel: bool = False
    layers_per_stage: list[int] | None = None  # uneven split (--layers-per-stage)
    distributed_backend: str = "gloo"
    device: str = "cpu"
    distributed_timeout_minutes: int = 10
    overlap_grad_reduce: bool = False

    @property
    def stages(self) -> int:
        """Pipeline stages that run (the process grid's pp)."""
        return self.run_pp or self.pp

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def world_size(self) -> int:
        return self.tp * self.stages * self.dp

    @property
    def dims(self) -> ParallelDims:
        try:
            return ParallelDims(tp=self.tp, pp=self.stages, dp=self.dp, vpp=self.vpp)
        except ParallelConfigError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> "ParallelConfig":
        _ = self.dims  # building ParallelDims checks the sizes and the vpp / pp pairing
        _require(1 <= self.stages <= self.pp,
                 f"--tune-exit-pipeline-parallel-size ({self.run_pp}) must lie in 1..--pipeline-model-parallel-size "
                 f"({self.pp})")
        _require(self.device in DEVICES, f"--device must be cpu or cuda, got {self.device!r}")
        _require(self.distributed_backend in BACKENDS,
                 f"--distributed-backend must be gloo or nccl, got {self.distributed_backend!r}")
        _require(not (self.device == "cpu" and self.distributed_backend == "nccl"),
                 "--distributed-backend nccl needs --device cuda; use gloo on CPU (or drop the flag: the backend "
                 "follows the device)")
        _require(not (self.sequence_parallel and self.tp == 1),
                 "--sequence-parallel needs --tensor-model-parallel-size > 1")
        _require(self.distributed_timeout_minutes > 0,
                 f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        return self


@dataclass
class TrainingConfig:
    """Batch sizes, run length, evaluation, exit criteria, seed and the early-exit schedule options."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_microbatches: int = 1
    train_iters: int | None = None
    train_samples: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 100
    skip_train: bool = False
    exit_interval: int | None = None
    exit_duration_in_mins: int | None = None
    exit_signal_handler: bool = False
    seed: int = 1234
    data_parallel_random_init: bool = False
    check_for_nan_in_loss_and_grad: bool = True
    fp16_lm_cross_entropy: bool = False
    fill_explicit_bubbles: bool = False
    num_fill_warmup_microbatches: int | None = None
    num_fill_cooldown_microbatches: int | None = None
    backward_forward_ratio: float = 2.0
    tune_exit: bool = False
    tune_exit_pipeline_parallel_size: int | None = None

    def validate(self, dp: int, pp: int, training: bool = True) -> "TrainingConfig":
        mb, gb = self.micro_batch_size, self.global_batch_size
        _require(mb >= 1, f"--micro-batch-size must be >= 1, got {mb}")
        _require(gb >= 1, f"--global-batch-size must be >= 1, got {gb}")
        _require(gb % (mb * dp) == 0,
                 f"--global-batch-size ({gb}) must be divisible by --micro-batch-size ({mb}) x data-parallel size "
                 f"({dp}) = {mb * dp}; use a multiple of {mb * dp}")
        _require(self.num_microbatches == gb // (mb * dp),
                 f"num_microbatches ({self.num_microbatches}) != --global-batch-size / (--micro-batch-size x dp)")
        _require(not (self.train_iters is not None and self.train_samples is not None),
                 "--train-iters and --train-samples are exclusive; give one")
        if training:
            _require(self.train_iters is not None or self.train_samples is not None,
                     "give the run length: --train-iters N or --train-samples N")
        for flag, value in (("--train-iters", self.train_iters), ("--train-samples", self.train_samples),
                            ("--exit-interval", self.exit_interval),
                            ("--exit-duration-in-mins", self.exit_duration_in_mins)):
            _require(value is None or value > 0, f"{flag} must be positive, got {value}")
        _require(self.eval_interval >= 1, f"--eval-interval must be >= 1, got {self.eval_interval}")
        _require(self.eval_iters >= 0, f"--eval-iters must be >= 0 (0 disables evaluation), got {self.eval_iters}")
        _require(self.backward_forward_ratio > 0,
                 f"--backward-forward-ratio must be positive, got {self.backward_forward_ratio}")
        if self.fill_explicit_bubbles:
            self._validate_fill(pp)
        return self

    def _validate_fill(self, pp: int) -> None:
        _require(pp > 1, "--fill-explicit-bubbles needs --pipeline-model-parallel-size > 1 (there are no bubbles)")
        opt = optimal_fill_microbatches(pp, self.backward_forward_ratio)
        for flag, n in (("--num-fill-warmup-microbatches", self.num_fill_warmup_microbatches),
                        ("--num-fill-cooldown-microbatches", self.num_fill_cooldown_microbatches)):
            _require(isinstance(n, int) and 0 <= n <= opt,
                     f"{flag} must lie in 0..{opt} (int((pp-1)*R/(1+R)) with --backward-forward-ratio R), got {n}")


@dataclass
class DataConfig:
    """Datasets, split, sequence handling and the tokenizer flags."""

    data_path: list[str] | None = None
    split: str = "969, 30, 1"
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    data_cache_path: str | None = None
    mock_data: bool = False
    seq_length: int = 16
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 2
    dataloader_type: str = "single"
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    vocab_extra_ids: int = 0
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None

    def validate(self, training: bool = True) -> "DataConfig":
        split_paths = self.train_data_path or self.valid_data_path or self.test_data_path
        _require(not (self.mock_data and (self.data_path or split_paths)),
                 "--mock-data replaces the datasets; drop --data-path / --train-data-path / ... or --mock-data")
        _require(not (self.data_path and split_paths),
                 "--data-path is exclusive with --train-data-path / --valid-data-path / --test-data-path; "
                 "use --data-path with --split, or the three per-split paths")
        if training:
            _require(self.mock_data or bool(self.data_path) or bool(self.train_data_path),
                     "no training data: pass --data-path (with --split), --train-data-path, or --mock-data")
        if not self.mock_data and (self.data_path or split_paths):
            _require(self.tokenizer_type is not None,
                     "--tokenizer-type is required with --data-path (the tokenizer gives the end-of-document id)")
        if self.mock_data and self.tokenizer_type is None:
            _require(self.vocab_size is not None and self.vocab_size >= 2,
                     "--mock-data without --tokenizer-type needs --vocab-size (>= 2)")
        self._check_paths()
        _require(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        _require(self.dataloader_type in ("single", "cyclic"),
                 f"--dataloader-type must be single or cyclic, got {self.dataloader_type!r}")
        return self

    def _check_paths(self) -> None:
        from megatron.data.blendable_dataset import parse_blend
        from megatron.data.gpt_dataset import get_train_valid_test_split

        try:
            get_train_valid_test_split(self.split, 1000)
            for flag, paths in (("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                                ("--valid-data-path", self.valid_data_path),
                                ("--test-data-path", self.test_data_path)):
                if paths and len(paths) > 1:
                    try:
                        parse_blend(paths, [0, 0, 0])
                    except ValueError as e:
                        raise ValueError(str(e).replace("--data-path", flag)) from None
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class CheckpointConfig:
    """Saving and loading (Megatron's checkpoint layout)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    load_iteration: int = 0  # 0: the tracker file's iteration
    no_save_optim: bool = False
    no_save_rng: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    use_checkpoint_args: bool = False
    exit_on_missing_checkpoint: bool = False
    perform_initialization: bool = True

    def validate(self) -> "CheckpointConfig":
        _require(self.save is None or self.save_interval is not None,
                 "--save needs --save-interval N (iterations between checkpoints)")
        _require(self.save_interval is None or self.save_interval >= 1,
                 f"--save-interval must be >= 1, got {self.save_interval}")
        _require(self.load_iteration >= 0,
                 f"--load-iteration must be >= 0 (0: the latest checkpoint), got {self.load_iteration}")
        for flag, used in (("--load-iteration", self.load_iteration > 0),
                           ("--use-checkpoint-args", self.use_checkpoint_args),
                           ("--exit-on-missing-checkpoint", self.exit_on_missing_checkpoint),
                           ("--finetune", self.finetune)):
            _require(not used or self.load is not None, f"{flag} needs --load DIR (the checkpoint to read)")
        return self


@dataclass
class LoggingConfig:
    """Console, TensorBoard and W&B logging (EE-LLM's ``*-to-tracker`` names)."""

    log_interval: int = 100
    tensorboard_dir: str | None = None
    tracker_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_timers_to_tracker: bool = False
    log_batch_size_to_tracker: bool = False
    log_learning_rate_to_tracker: bool = True
    log_loss_scale_to_tracker: bool = True
    log_validation_ppl_to_tracker: bool = False
    log_memory_to_tracker: bool = False
    log_world_size_to_tracker: bool = False
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    timing_log_level: int = 0
    timing_log_option: str = "minmax"
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_exp_name: str = "default"
    wandb_save_dir: str = ""

    def validate(self) -> "LoggingConfig":
        for flag, value in (("--log-interval", self.log_interval),
                            ("--tracker-log-interval", self.tracker_log_interval),
                            ("--tensorboard-queue-size", self.tensorboard_queue_size)):
            _require(value >= 1, f"{flag} must be >= 1, got {value}")
        _require(self.timing_log_level in (0, 1, 2), f"--timing-log-level must be 0, 1 or 2, got {self.timing_log_level}")
        _require(self.timing_log_option in ("max", "minmax", "all"),
                 f"--timing-log-option must be max, minmax or all, got {self.timing_log_option!r}")
        return self


@dataclass
class RunConfig:
    """Every section of one run."""

    model: ModelConfig
    early_exit: EarlyExitConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def partition(self) -> Partition:
        p = self.parallel
        return partition(self.model.num_layers, p.pp, p.chunks, self.early_exit.exit_layer_nums, p.layers_per_stage)

    def validate(self, training: bool = True) -> "RunConfig":
        """Check every section and the rules that span sections; return self."""
        p, t = self.parallel.validate(), self.training
        self.model.validate(p.tp)
        self.early_exit.validate(self.model.num_layers)
        layout = self.partition()
        t.validate(p.dp, p.pp, training)
        self.data.validate(training)
        self.checkpoint.validate()
        self.logging.validate()
        if training:
            self.optimizer.validate()
            self.optimizer.validate_schedule(t.train_iters, t.train_samples)
            self._validate_lr_lengths()
        _require(self.model.sequence_parallel == p.sequence_parallel,
                 "model.sequence_parallel and parallel.sequence_parallel disagree (--sequence-parallel)")
        _require(self.data.seq_length == self.model.seq_length, "data.seq_length != model.seq_length (--seq-length)")
        _require(not (self.optimizer.fp16 and self.optimizer.bf16), "--fp16 and --bf16 are exclusive; pick one")
        _require(not t.fp16_lm_cross_entropy or self.optimizer.fp16, "--fp16-lm-cross-entropy needs --fp16")
        if t.fill_explicit_bubbles:
            _require(bool(self.early_exit.exit_layer_nums),
                     "--fill-explicit-bubbles fills bubbles with exit work: it needs --exit-layer-nums")
            _require(p.chunks == 1, "--fill-explicit-bubbles works on the non-interleaved 1F1B schedule; drop "
                                    "--num-layers-per-virtual-pipeline-stage")
            _require(not t.tune_exit, "--fill-explicit-bubbles cannot be combined with --tune-exit (EE-Tuning has "
                                      "its own schedule)")
        self._validate_tuning(layout)
        return self

    def _validate_tuning(self, layout: Partition) -> None:
        p, t = self.parallel, self.training
        if not t.tune_exit:
            _require(p.stages == p.pp, "only --tune-exit runs fewer stages than --pipeline-model-parallel-size")
            return
        k = t.tune_exit_pipeline_parallel_size  # its range was checked by ParallelConfig.validate (run_pp)
        _require(p.stages == k, f"parallel.run_pp ({p.run_pp}) != --tune-exit-pipeline-parallel-size ({k})")
        _require(bool(self.early_exit.exit_layer_nums),
                 "--tune-exit trains only the exits: give --exit-layer-nums")
        _require(p.chunks == 1, "--tune-exit does not support --num-layers-per-virtual-pipeline-stage (the tuned "
                                "stages must be the leading layers of the model)")
        last = max(layout.exit_stages)
        _require(k >= last + 1,
                 f"--tune-exit-pipeline-parallel-size {k} stops before stage {last}, which holds an exit of "
                 f"--exit-layer-nums; use at least {last + 1}")
        _require(self.checkpoint.load is not None,
                 "--tune-exit trains only the exits of a pretrained model: give --load CKPT (usually with "
                 "--finetune); without it the exits would be tuned on a random backbone")

    def _validate_lr_lengths(self) -> None:
        """Megatron's scheduler needs a decay length longer than the warm-up (both counted in samples)."""
        o, t = self.optimizer, self.training
        gb = t.global_batch_size
        if t.train_iters is not None:
            decay = (o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters) * gb
            warmup_flag, warmup = "--lr-warmup-iters", o.lr_warmup_iters * gb
            decay_flag = "--lr-decay-iters (default --train-iters)"
        else:
            decay = o.lr_decay_samples if o.lr_decay_samples is not None else t.train_samples
            warmup_flag, warmup = "--lr-warmup-samples", o.lr_warmup_samples
            decay_flag = "--lr-decay-samples (default --train-samples)"
        _require(decay > 0, f"{decay_flag} must be positive, got {decay}")
        if o.lr_warmup_fraction is not None:
            warmup_flag, warmup = "--lr-warmup-fraction", o.lr_warmup_fraction * decay
        _require(warmup < decay, f"{warmup_flag} gives a warm-up ({warmup:g} samples) not shorter than the decay "
                                 f"{decay_flag} ({decay} samples); shorten the warm-up or lengthen the decay")

    def to_args(self) -> argparse.Namespace:
        """The Megatron-named flat Namespace of these sections (checkpoints store it as ``args``)."""
        flat: dict = {}
        for section in (self.model, self.early_exit, self.optimizer, self.training, self.data, self.checkpoint,
                        self.logging):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                flat[f.name] = list(value) if isinstance(value, list) else value
        p = self.parallel
        per_stage = (p.layers_per_stage or [self.model.num_layers // p.pp])[0]
        flat.update(
            num_layers_per_virtual_pipeline_stage=per_stage // p.vpp if p.vpp else None,
            tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp, data_parallel_size=p.dp,
            virtual_pipeline_model_parallel_size=p.vpp, sequence_parallel=p.sequence_parallel,
            layers_per_stage=list(p.layers_per_stage) if p.layers_per_stage else None,
            distributed_backend=p.distributed_backend, device=p.device,
            distributed_timeout_minutes=p.distributed_timeout_minutes, overlap_grad_reduce=p.overlap_grad_reduce,
            world_size=p.world_size, group_query_attention=self.model.num_query_groups is not None,
            num_query_groups=self.model.num_query_groups or 1,  # Megatron's default when GQA is off
        )
        return argparse.Namespace(**flat)


def _pick(cls, args: argparse.Namespace, **overrides):
    """An instance of section ``cls`` from the ``args`` attributes named like its fields."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            kwargs[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return cls(**kwargs)


def _vocab_size(args: argparse.Namespace, vocab_size: int | None) -> int:
    for value in (vocab_size, getattr(args, "vocab_size", None), getattr(args, "padded_vocab_size", None)):
        if value is not None:
            return value
    raise ConfigError("the vocabulary size is unknown: build the tokenizer first and pass its vocab_size, or give "
                      "--vocab-size / --padded-vocab-size")


def configs_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> RunConfig:
    """Typed sections of a Namespace that ``validate_args`` has derived (dp, ffn size, fill counts ...).

    ``vocab_size``: the tokenizer's vocabulary (before padding); without it ``--vocab-size`` or
    ``--padded-vocab-size`` is used. Values are copied: later changes to ``args`` do not leak in."""
    tp = args.tensor_model_parallel_size
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    model = _pick(ModelConfig, args, vocab_size=_vocab_size(args, vocab_size), num_query_groups=groups,
                  params_dtype=getattr(args, "params_dtype", torch.float32))
    parallel = ParallelConfig(
        tp=tp, pp=args.pipeline_model_parallel_size, dp=args.data_parallel_size,
        vpp=args.virtual_pipeline_model_parallel_size,
        run_pp=args.tune_exit_pipeline_parallel_size if args.tune_exit else None,
        sequence_parallel=args.sequence_parallel,
        layers_per_stage=list(args.layers_per_stage) if args.layers_per_stage else None,
        distributed_backend=args.distributed_backend, device=args.device,
        distributed_timeout_minutes=args.distributed_timeout_minutes, overlap_grad_reduce=args.overlap_grad_reduce,
    )
    return RunConfig(
        model=model,
        early_exit=_pick(EarlyExitConfig, args),
        parallel=parallel,
        optimizer=_pick(OptimizerConfig, args),
        training=_pick(TrainingConfig, args),
        data=_pick(DataConfig, args),
        checkpoint=_pick(CheckpointConfig, args),
        logging=_pick(LoggingConfig, args),
    )
