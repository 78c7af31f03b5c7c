"""The run's configuration sections and :class:`RunConfig`, the typed form of a whole run.

``megatron.arguments.resolve`` builds a validated :class:`RunConfig` from parsed flags, once per
process; training, the server, evaluation and the tools take that result. Core code takes the
sections, never the Namespace. Field names are the Megatron / EE-LLM ``args`` attribute names (so a
checkpoint's ``args`` maps one to one: :meth:`RunConfig.from_args` and :meth:`RunConfig.to_args`),
except :class:`ParallelConfig`, which uses the short axis names ``tp`` / ``pp`` / ``dp`` / ``vpp``.

Every field has one home section and a one-line meaning:
:class:`~megatron.config.ModelConfig` (the transformer: sizes, vocabulary, sequence length, sequence
parallelism, recomputation, the seed), :class:`~megatron.config.EarlyExitConfig` (the exits),
:class:`~megatron.optimizer.config.OptimizerConfig` (optimizer, lr / weight-decay schedule, mixed
precision), and here :class:`ParallelConfig`, :class:`TrainingConfig`, :class:`DataConfig`,
:class:`CheckpointConfig`, :class:`LoggingConfig`. Every ``validate`` raises
:class:`~megatron.errors.ConfigError` naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelConfigError, ParallelDims
from megatron.core.pipeline_parallel.schedules import ScheduleError, fill_counts
from megatron.errors import ConfigError, require
from megatron.model.partition import Partition, partition
from megatron.optimizer.config import OptimizerConfig

__all__ = [
    "ParallelConfig", "TrainingConfig", "DataConfig", "CheckpointConfig", "LoggingConfig", "RunConfig",
]

DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")


@dataclass
class ParallelConfig:
    """Parallel layout. ``pp`` stages partition the model; ``run_pp`` of them are built and run (fewer
    only in EE-Tuning with ``--tune-exit-pipeline-parallel-size``); ``dp = world / (tp * run_pp)``."""

    tp: int = 1  # tensor-parallel size (--tensor-model-parallel-size)
    pp: int = 1  # pipeline stages the model is split into (--pipeline-model-parallel-size)
    dp: int = 1  # data-parallel size, derived: world / (tp * run_pp)
    vpp: int | None = None  # model chunks per stage (from --num-layers-per-virtual-pipeline-stage); None: 1
    run_pp: int | None = None  # stages built and run (--tune-exit-pipeline-parallel-size); None: pp
    layers_per_stage: list[int] | None = None  # uneven split, one layer count per stage (--layers-per-stage)
    distributed_backend: str = "gloo"  # gloo | nccl (--distributed-backend)
    device: str = "cpu"  # where tensors live: cpu | cuda (--device)
    distributed_timeout_minutes: int = 10  # collective timeout of the process groups
    overlap_grad_reduce: bool = False  # start dp gradient reduction during the backward, bucket by bucket

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
        require(1 <= self.stages <= self.pp,
                f"--tune-exit-pipeline-parallel-size ({self.run_pp}) must lie in 1..--pipeline-model-parallel-size "
                f"({self.pp})")
        require(self.device in DEVICES, f"--device must be cpu or cuda, got {self.device!r}")
        require(self.distributed_backend in BACKENDS,
                f"--distributed-backend must be gloo or nccl, got {self.distributed_backend!r}")
        require(not (self.device == "cpu" and self.distributed_backend == "nccl"),
                "--distributed-backend nccl needs --device cuda; use gloo on CPU (or drop the flag: the backend "
                "follows the device)")
        # Gloo moves CUDA tensors for broadcast and all-reduce only (PyTorch's backend table); the pipeline's
        # send / recv and the all-gathers would fail, so the run used to fall back to the CPU unnoticed.
        require(not (self.device == "cuda" and self.distributed_backend == "gloo"),
                "--distributed-backend gloo cannot run --device cuda: gloo moves CUDA tensors for broadcast and "
                "all-reduce only (no send / recv, all-gather or reduce-scatter); use nccl (the default on CUDA) "
                "or --device cpu")
        require(self.distributed_timeout_minutes > 0,
                f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        return self


@dataclass
class TrainingConfig:
    """Batch sizes, run length, evaluation, exit criteria and the early-exit schedule options."""

    micro_batch_size: int = 1  # samples per microbatch and data-parallel rank
    global_batch_size: int = 1  # samples per iteration, over all data-parallel ranks
    num_microbatches: int = 1  # derived: global_batch_size / (micro_batch_size * dp)
    train_iters: int | None = None  # iterations to train (or train_samples)
    train_samples: int | None = None  # samples to train (or train_iters)
    eval_interval: int = 1000  # iterations between evaluations
    eval_iters: int = 100  # validation batches per evaluation (0: no evaluation)
    skip_train: bool = False  # only evaluate
    exit_interval: int | None = None  # save and stop when the iteration divides by this
    exit_duration_in_mins: int | None = None  # save and stop after this many minutes
    exit_signal_handler: bool = False  # on SIGTERM: save, then stop
    data_parallel_random_init: bool = False  # different initial weights per data-parallel rank
    check_for_nan_in_loss_and_grad: bool = True  # stop on a NaN loss or gradient norm
    fp16_lm_cross_entropy: bool = False  # the final head's cross entropy in fp16 (with --fp16)
    fill_explicit_bubbles: bool = False  # fill pipeline bubbles with exit-training microbatches
    num_fill_warmup_microbatches: int | None = None  # warm-up fills; resolved by filling.fill_counts
    num_fill_cooldown_microbatches: int | None = None  # cool-down fills; resolved by filling.fill_counts
    backward_forward_ratio: float = 2.0  # backward / forward time, the fill planner's cost model
    tune_exit: bool = False  # EE-Tuning: train only the exits, the backbone frozen
    tune_exit_pipeline_parallel_size: int | None = None  # EE-Tuning: stages built and run

    def validate(self, dp: int, pp: int, training: bool = True) -> "TrainingConfig":
        mb, gb = self.micro_batch_size, self.global_batch_size
        require(mb >= 1, f"--micro-batch-size must be >= 1, got {mb}")
        require(gb >= 1, f"--global-batch-size must be >= 1, got {gb}")
        require(gb % (mb * dp) == 0,
                f"--global-batch-size ({gb}) must be divisible by --micro-batch-size ({mb}) x data-parallel size "
                f"({dp}) = {mb * dp}; use a multiple of {mb * dp}")
        require(self.num_microbatches == gb // (mb * dp),
                f"num_microbatches ({self.num_microbatches}) != --global-batch-size / (--micro-batch-size x dp)")
        require(not (self.train_iters is not None and self.train_samples is not None),
                "--train-iters and --train-samples are exclusive; give one")
        if training:
            require(self.train_iters is not None or self.train_samples is not None,
                    "give the run length: --train-iters N or --train-samples N")
        for flag, value in (("--train-iters", self.train_iters), ("--train-samples", self.train_samples),
                            ("--exit-interval", self.exit_interval),
                            ("--exit-duration-in-mins", self.exit_duration_in_mins)):
            require(value is None or value > 0, f"{flag} must be positive, got {value}")
        require(self.eval_interval >= 1, f"--eval-interval must be >= 1, got {self.eval_interval}")
        require(self.eval_iters >= 0, f"--eval-iters must be >= 0 (0 disables evaluation), got {self.eval_iters}")
        if self.fill_explicit_bubbles:
            self._validate_fill(pp)
        return self

    def _validate_fill(self, pp: int) -> None:
        """The fill counts must be resolved (``resolve`` sets them through the rule's one home,
        :func:`~megatron.core.pipeline_parallel.schedules.fill_counts`), i.e. left unchanged by it."""
        counts = (self.num_fill_warmup_microbatches, self.num_fill_cooldown_microbatches)
        try:
            bound, _ = fill_counts(pp, self.backward_forward_ratio)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
        for flag, n in zip(("--num-fill-warmup-microbatches", "--num-fill-cooldown-microbatches"), counts):
            require(isinstance(n, int) and 0 <= n <= bound,
                    f"{flag} must lie in 0..{bound} (the fill bound for pp {pp} and --backward-forward-ratio "
                    f"{self.backward_forward_ratio}), got {n}")


@dataclass
class DataConfig:
    """Datasets, split, document handling, the loader and the tokenizer files (the vocabulary sizes
    and the sequence length are the model's: :class:`~megatron.config.ModelConfig`)."""

    data_path: list[str] | None = None  # PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (a blend), split by --split
    split: str = "969, 30, 1"  # train, valid, test proportions of data_path
    train_data_path: list[str] | None = None  # the training split's own prefixes (instead of data_path)
    valid_data_path: list[str] | None = None  # the validation split's own prefixes
    test_data_path: list[str] | None = None  # the test split's own prefixes
    data_cache_path: str | None = None  # directory of the dataset index cache (default: beside the data)
    mock_data: bool = False  # synthetic tokens instead of datasets
    reset_position_ids: bool = False  # positions restart after each end-of-document token
    reset_attention_mask: bool = False  # no attention across documents
    eod_mask_loss: bool = False  # no loss on end-of-document tokens
    num_workers: int = 2  # data-loader worker processes
    dataloader_type: str = "single"  # single (one pass, resumable) | cyclic (reshuffled per epoch)
    tokenizer_type: str | None = None  # GPT2BPETokenizer | SentencePieceTokenizer | Llama2Tokenizer | ...
    tokenizer_model: str | None = None  # SentencePiece model, or a Hugging Face tokenizer file / directory
    vocab_file: str | None = None  # GPT-2 BPE vocabulary (encoder JSON)
    merge_file: str | None = None  # GPT-2 BPE merges
    vocab_extra_ids: int = 0  # <extra_id_i> tokens appended to a SentencePiece vocabulary

    def validate(self, training: bool = True) -> "DataConfig":
        split_paths = self.train_data_path or self.valid_data_path or self.test_data_path
        require(not (self.mock_data and (self.data_path or split_paths)),
                "--mock-data replaces the datasets; drop --data-path / --train-data-path / ... or --mock-data")
        require(not (self.data_path and split_paths),
                "--data-path is exclusive with --train-data-path / --valid-data-path / --test-data-path; "
                "use --data-path with --split, or the three per-split paths")
        if training:
            require(self.mock_data or bool(self.data_path) or bool(self.train_data_path),
                    "no training data: pass --data-path (with --split), --train-data-path, or --mock-data")
        if not self.mock_data and (self.data_path or split_paths):
            require(self.tokenizer_type is not None,
                    "--tokenizer-type is required with --data-path (the tokenizer gives the end-of-document id)")
        self._check_paths()
        require(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        require(self.dataloader_type in ("single", "cyclic"),
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

    save: str | None = None  # directory to save checkpoints to
    load: str | None = None  # directory to load a checkpoint from
    save_interval: int | None = None  # iterations between saves
    load_iteration: int = 0  # iteration to load; 0: the tracker file's latest
    no_save_optim: bool = False  # save without optimizer and scheduler state
    no_save_rng: bool = False  # save without the random-number generators' states
    no_load_optim: bool = False  # load the model only, not the optimizer state
    no_load_rng: bool = False  # keep this run's random-number generators
    finetune: bool = False  # load the weights only; iteration and consumed samples restart at 0
    use_checkpoint_args: bool = False  # take the model flags from the checkpoint's args
    exit_on_missing_checkpoint: bool = False  # fail when --load holds no checkpoint (else start fresh)
    perform_initialization: bool = True  # draw initial weights (off: --no-initialization, a load follows)

    def validate(self) -> "CheckpointConfig":
        require(self.save is None or self.save_interval is not None,
                "--save needs --save-interval N (iterations between checkpoints)")
        require(self.save_interval is None or self.save_interval >= 1,
                f"--save-interval must be >= 1, got {self.save_interval}")
        require(self.load_iteration >= 0,
                f"--load-iteration must be >= 0 (0: the latest checkpoint), got {self.load_iteration}")
        for flag, used in (("--load-iteration", self.load_iteration > 0),
                           ("--use-checkpoint-args", self.use_checkpoint_args),
                           ("--exit-on-missing-checkpoint", self.exit_on_missing_checkpoint),
                           ("--finetune", self.finetune)):
            require(not used or self.load is not None, f"{flag} needs --load DIR (the checkpoint to read)")
        return self


@dataclass
class LoggingConfig:
    """Console, TensorBoard and W&B logging (EE-LLM's ``*-to-tracker`` names)."""

    log_interval: int = 100  # iterations between console lines
    tensorboard_dir: str | None = None  # write TensorBoard logs here (None: no TensorBoard)
    tracker_log_interval: int = 1  # iterations between tracker (TensorBoard / W&B) points
    tensorboard_queue_size: int = 1000  # events TensorBoard buffers before writing
    log_timers_to_tracker: bool = False  # per-iteration timers to the trackers
    log_batch_size_to_tracker: bool = False  # the global batch size to the trackers
    log_learning_rate_to_tracker: bool = True  # the learning rate to the trackers
    log_loss_scale_to_tracker: bool = True  # the loss scale to the trackers
    log_validation_ppl_to_tracker: bool = False  # validation perplexities beside the losses
    log_memory_to_tracker: bool = False  # peak memory to the trackers
    log_world_size_to_tracker: bool = False  # the world size to the trackers
    log_params_norm: bool = False  # the parameters' L2 norm on the console line
    timing_log_level: int = 0  # 0..2: how many timers are measured
    timing_log_option: str = "minmax"  # timers over ranks: max | minmax | all
    wandb_project: str | None = None  # W&B project (None: W&B off)
    wandb_group: str | None = None  # W&B run group
    wandb_exp_name: str = "default"  # W&B run name
    wandb_save_dir: str = ""  # W&B's local directory ("": under --save)

    def validate(self) -> "LoggingConfig":
        for flag, value in (("--log-interval", self.log_interval),
                            ("--tracker-log-interval", self.tracker_log_interval),
                            ("--tensorboard-queue-size", self.tensorboard_queue_size)):
            require(value >= 1, f"{flag} must be >= 1, got {value}")
        require(self.timing_log_level in (0, 1, 2), f"--timing-log-level must be 0, 1 or 2, got {self.timing_log_level}")
        require(self.timing_log_option in ("max", "minmax", "all"),
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
        self.early_exit.validate_vocab(self.model.vocab_size)
        layout = self.partition()
        t.validate(p.dp, p.pp, training)
        self.data.validate(training)
        self.checkpoint.validate()
        self.logging.validate()
        self.optimizer.validate_precision()
        if training:
            self.optimizer.validate()
            self.optimizer.validate_schedule(t.train_iters, t.train_samples)
            self._validate_lr_lengths()
        require(not (self.model.sequence_parallel and p.tp == 1),
                "--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.data.mock_data and self.data.tokenizer_type is None:
            require(self.model.vocab_size >= 2, "--mock-data without --tokenizer-type needs --vocab-size (>= 2)")
        require(not t.fp16_lm_cross_entropy or self.optimizer.fp16, "--fp16-lm-cross-entropy needs --fp16")
        if t.fill_explicit_bubbles:
            require(bool(self.early_exit.exit_layer_nums),
                    "--fill-explicit-bubbles fills bubbles with exit work: it needs --exit-layer-nums")
            require(p.chunks == 1, "--fill-explicit-bubbles works on the non-interleaved 1F1B schedule; drop "
                                   "--num-layers-per-virtual-pipeline-stage")
            require(not t.tune_exit, "--fill-explicit-bubbles cannot be combined with --tune-exit (EE-Tuning has "
                                     "its own schedule)")
        self._validate_tuning(layout)
        if training:
            self._validate_teacher()
        return self

    def _validate_teacher(self) -> None:
        """The objectives against the final head (``EarlyExitConfig.needs_teacher``) need it frozen and run."""
        ee, p, t = self.early_exit, self.parallel, self.training
        if not ee.needs_teacher:
            return
        what = "--exit-distillation-weight > 0" if ee.exit_distillation_weight > 0 else "--exit-estimator"
        require(t.tune_exit, f"{what} trains the exits against the model's own final head, which must stay "
                             "fixed: it needs --tune-exit (a frozen backbone)")
        require(p.stages == p.pp, f"{what} needs the final head on the last stage: --tune-exit-pipeline-parallel-size "
                                  f"({p.stages}) must equal --pipeline-model-parallel-size ({p.pp})")
        require(ee.exit_distillation_top_k <= self.model.vocab_size,
                f"--exit-distillation-top-k ({ee.exit_distillation_top_k}) exceeds the vocabulary ({self.model.vocab_size})")

    def _validate_tuning(self, layout: Partition) -> None:
        p, t = self.parallel, self.training
        if not t.tune_exit:
            require(p.stages == p.pp, "only --tune-exit runs fewer stages than --pipeline-model-parallel-size")
            return
        k = t.tune_exit_pipeline_parallel_size  # its range was checked by ParallelConfig.validate (run_pp)
        require(p.stages == k, f"parallel.run_pp ({p.run_pp}) != --tune-exit-pipeline-parallel-size ({k})")
        require(bool(self.early_exit.exit_layer_nums),
                "--tune-exit trains only the exits: give --exit-layer-nums")
        require(p.chunks == 1, "--tune-exit does not support --num-layers-per-virtual-pipeline-stage (the tuned "
                               "stages must be the leading layers of the model)")
        last = max(layout.exit_stages)
        require(k >= last + 1,
                f"--tune-exit-pipeline-parallel-size {k} stops before stage {last}, which holds an exit of "
                f"--exit-layer-nums; use at least {last + 1}")
        require(self.checkpoint.load is not None,
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
        require(decay > 0, f"{decay_flag} must be positive, got {decay}")
        if o.lr_warmup_fraction is not None:
            warmup_flag, warmup = "--lr-warmup-fraction", o.lr_warmup_fraction * decay
        require(warmup < decay, f"{warmup_flag} gives a warm-up ({warmup:g} samples) not shorter than the decay "
                                f"{decay_flag} ({decay} samples); shorten the warm-up or lengthen the decay")

    # ------------------------------------------------------------------ the Megatron-named Namespace
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
            virtual_pipeline_model_parallel_size=p.vpp,
            layers_per_stage=list(p.layers_per_stage) if p.layers_per_stage else None,
            distributed_backend=p.distributed_backend, device=p.device,
            distributed_timeout_minutes=p.distributed_timeout_minutes, overlap_grad_reduce=p.overlap_grad_reduce,
            world_size=p.world_size, group_query_attention=self.model.num_query_groups is not None,
            num_query_groups=self.model.num_query_groups or 1,  # Megatron's default when GQA is off
        )
        return argparse.Namespace(**flat)

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int | None = None) -> "RunConfig":
        """The sections of a Namespace whose derived values are set (dp, ffn size, fill counts ...: what
        ``megatron.arguments.resolve`` derives), not validated. ``vocab_size``: the tokenizer's vocabulary
        (before padding); without it ``--vocab-size`` or ``--padded-vocab-size`` is used. Values are
        copied: later changes to ``args`` do not leak in."""
        groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
        model = _pick(ModelConfig, args, vocab_size=_vocab_size(args, vocab_size), num_query_groups=groups,
                      params_dtype=getattr(args, "params_dtype", torch.float32))
        parallel = ParallelConfig(
            tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, dp=args.data_parallel_size,
            vpp=args.virtual_pipeline_model_parallel_size,
            run_pp=args.tune_exit_pipeline_parallel_size if args.tune_exit else None,
            layers_per_stage=list(args.layers_per_stage) if args.layers_per_stage else None,
            distributed_backend=args.distributed_backend, device=args.device,
            distributed_timeout_minutes=args.distributed_timeout_minutes, overlap_grad_reduce=args.overlap_grad_reduce,
        )
        return cls(model=model, early_exit=_pick(EarlyExitConfig, args), parallel=parallel,
                   optimizer=_pick(OptimizerConfig, args), training=_pick(TrainingConfig, args),
                   data=_pick(DataConfig, args), checkpoint=_pick(CheckpointConfig, args),
                   logging=_pick(LoggingConfig, args))


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
