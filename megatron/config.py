"""The model's configuration sections: :class:`ModelConfig` (the transformer) and :class:`EarlyExitConfig`
(the exits), with their validation.

Field names are Megatron / EE-LLM ``args`` attribute names so that checkpoints' ``args`` and launch
scripts map one to one. ``validate`` methods raise :class:`~megatron.errors.ConfigError` whose message
names the command-line flag and the fix; they run before any process group or tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron.errors import ConfigError, require

__all__ = ["ConfigError", "ModelConfig", "EarlyExitConfig"]  # ConfigError: megatron.errors's, for importers


@dataclass
class ModelConfig:
    """The GPT / Llama transformer (Megatron flag names; defaults as Megatron / EE-LLM)."""

    num_layers: int = 2  # transformer layers of the whole model (all stages)
    hidden_size: int = 64  # width h of the residual stream
    num_attention_heads: int = 4  # query heads per layer
    num_query_groups: int | None = None  # key/value heads (GQA); None: one per query head (multi-head attention)
    ffn_hidden_size: int | None = None  # MLP inner size; None: 4h, or int(8h/3/64)*64 with swiglu
    kv_channels: int | None = None  # head dimension; None: hidden_size / num_attention_heads
    seq_length: int = 16  # tokens per training sample (the data's sample length too)
    max_position_embeddings: int | None = None  # rows of the learned position table; None: seq_length
    vocab_size: int = 128  # the tokenizer's vocabulary (before padding)
    padded_vocab_size: int | None = None  # embedding rows; None: vocab_size padded (make_vocab_size_divisible_by)
    make_vocab_size_divisible_by: int = 128  # padding multiple of the vocabulary, per tensor-parallel rank
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    norm_epsilon: float = 1e-5  # epsilon of every norm
    swiglu: bool = False  # SwiGLU MLP (Llama) instead of GELU
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope
    rotary_percent: float = 1.0  # fraction of the head dimension RoPE rotates
    rotary_base: int = 10000  # RoPE frequency base
    add_bias_linear: bool = True  # biases on the linear layers (off: --disable-bias-linear)
    attention_dropout: float = 0.1  # dropout on the attention probabilities
    hidden_dropout: float = 0.1  # dropout on the attention and MLP outputs
    # Megatron divides scores by the layer number before an fp16 softmax and multiplies back inside it;
    # in exact arithmetic the result is unchanged and SDPA's softmax accumulates in fp32, so the flag
    # is accepted for compatibility and changes no numbers.
    apply_query_key_layer_scaling: bool = False
    untie_embeddings_and_output_weights: bool = False  # an output layer of its own instead of the embedding's
    init_method_std: float = 0.02  # std of the normal weight initialisation
    use_cpu_initialization: bool = False  # draw on the CPU (the weights of a CPU run), not on the device
    sequence_parallel: bool = False  # split norms and dropout over the tp ranks along the sequence (tp > 1)
    recompute_granularity: str | None = None  # activation recomputation: None | "full" | "selective"
    recompute_method: str | None = None  # with full recompute: "uniform" | "block"
    recompute_num_layers: int | None = None  # with full recompute: layers per recomputed group / per stage
    use_flash_attn: bool = False  # FlashAttention when installed, else PyTorch's SDPA
    params_dtype: torch.dtype = torch.float32  # parameter dtype (from --fp16 / --bf16)
    seed: int = 1234  # the run's seed: of the weights, and the base of the dropout and data-order seeds

    # ------------------------------------------------------------------ derived sizes
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int(8 * self.hidden_size / 3 / 64) * 64
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    def padded_vocab(self, tp: int) -> int:
        from megatron.core.tensor_parallel.utils import pad_vocab_size

        try:
            return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp, self.padded_vocab_size)
        except ValueError as e:
            raise ConfigError(f"{e} (--padded-vocab-size / --make-vocab-size-divisible-by)") from None

    # ------------------------------------------------------------------ validation
    def validate(self, tp: int = 1) -> "ModelConfig":
        """Check the model against itself and the tensor-parallel size; return self."""
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
            ("--seq-length", self.seq_length),
            ("--vocab-size", self.vocab_size),
        ):
            require(isinstance(value, int) and value >= 1, f"{flag} must be a positive integer, got {value!r}")
        self._validate_attention(tp)
        self._validate_choices()
        require(self.ffn_size >= 1, f"--ffn-hidden-size resolved to {self.ffn_size}; set it explicitly (> 0)")
        require(self.ffn_size % tp == 0, f"--ffn-hidden-size ({self.ffn_size}) must be divisible by tp ({tp})")
        for flag, p in (("--attention-dropout", self.attention_dropout), ("--hidden-dropout", self.hidden_dropout)):
            require(0.0 <= p < 1.0, f"{flag} must lie in [0, 1), got {p}")
        require(self.norm_epsilon > 0, f"--norm-epsilon must be positive, got {self.norm_epsilon}")
        require(self.init_method_std > 0, f"--init-method-std must be positive, got {self.init_method_std}")
        if self.position_embedding_type == "learned_absolute":
            require(
                self.seq_length <= self.max_positions,
                f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings ({self.max_positions})",
            )
        if self.sequence_parallel:
            require(
                self.seq_length % tp == 0,
                f"--sequence-parallel needs --seq-length ({self.seq_length}) divisible by tp ({tp})",
            )
        self.padded_vocab(tp)
        self._validate_recompute()
        return self

    def _validate_attention(self, tp: int) -> None:
        heads, groups = self.num_attention_heads, self.query_groups
        require(
            heads % tp == 0,
            f"--num-attention-heads ({heads}) must be divisible by --tensor-model-parallel-size ({tp})",
        )
        require(
            groups >= 1 and heads % groups == 0,
            f"--num-query-groups ({groups}) must divide --num-attention-heads ({heads})",
        )
        require(
            groups % tp == 0,
            f"--num-query-groups ({groups}) must be divisible by --tensor-model-parallel-size ({tp}); "
            "lower tp or use more query groups",
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % heads == 0,
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads ({heads}) "
                "unless --kv-channels is given",
            )
        require(self.head_dim >= 1, f"--kv-channels must be positive, got {self.kv_channels}")

    def _validate_choices(self) -> None:
        require(
            self.normalization in ("LayerNorm", "RMSNorm"),
            f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}",
        )
        require(
            self.position_embedding_type in ("learned_absolute", "rope"),
            f"--position-embedding-type must be learned_absolute or rope, got {self.position_embedding_type!r}",
        )
        if self.position_embedding_type == "rope":
            require(
                0.0 < self.rotary_percent <= 1.0 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                f"--rotary-percent ({self.rotary_percent}) must give an even, positive rotary dimension "
                f"of the head size {self.head_dim}",
            )
            require(self.rotary_base > 0, f"--rotary-base must be positive, got {self.rotary_base}")

    def _validate_recompute(self) -> None:
        g, m = self.recompute_granularity, self.recompute_method
        require(
            g in (None, "full", "selective"),
            f"--recompute-granularity must be full or selective, got {g!r}",
        )
        if g == "full":
            require(
                m in ("uniform", "block"),
                f"--recompute-granularity full needs --recompute-method uniform or block, got {m!r}",
            )
            n = self.recompute_num_layers
            require(
                isinstance(n, int) and n >= 1,
                f"--recompute-granularity full needs --recompute-num-layers >= 1, got {n!r}",
            )
        else:
            require(m is None, f"--recompute-method {m} needs --recompute-granularity full")


@dataclass
class EarlyExitConfig:
    """EE-LLM's early-exit flags (argument group "multexit"). Empty ``exit_layer_nums``: a plain GPT."""

    exit_layer_nums: list[int] = field(default_factory=list)  # 1-based layers with an exit, ascending
    exit_layer_weight: list[float] = field(default_factory=list)  # loss weight per exit; [] -> 1.0 each
    exit_layer_weight_init: list[float] = field(default_factory=list)  # weight at the warm-up start; [] -> 0.0
    exit_layer_weight_warmup_iters: int = 0  # iterations from the init weights to the final ones (0: none)
    exit_layer_weight_warmup_style: str = "linear"  # warm-up curve: linear | cosine
    exit_layer_temperature: list[float] = field(default_factory=list)  # training logit temperature; [] -> 1.0
    use_exit_norm: bool = False  # a norm before each exit's output projection
    use_exit_mlp: bool = False  # a branch MLP in each exit layer
    use_exit_block: bool = False  # a whole transformer layer in each exit
    untie_exit_output_weights: bool = False  # each exit has its own output projection
    pre_exit: bool = False  # an exit reads the input of its layer instead of its output
    use_dynamic_exit_layer_weight: bool = False  # weight each exit token's loss by its confidence
    # Ours (issue 13): exit parts, the self-distillation objective and inference helpers (README "Flags we add").
    use_exit_linear: bool = False  # h + W h + b before the exit norm (zero-initialised)
    exit_estimator: bool = False  # per exit, a small MLP predicting agreement with the final head
    exit_estimator_hidden: int = 64  # the estimator's hidden width
    exit_estimator_loss_weight: float = 1.0  # weight of the estimator's BCE in the tuning loss
    exit_vocab_size: int = 0  # K > 0: an exit_vocab buffer of K token ids (filled by the converter)
    exit_distillation_weight: float = 0.0  # w: exit loss = (1 - w) CE(labels) + w D(final head's top-k)
    exit_distillation_top_k: int = 64  # tokens of the final head's distribution kept (renormalised)
    exit_distillation_temperature: float = 1.0  # temperature of teacher and student in D

    @property
    def needs_teacher(self) -> bool:
        """Whether training needs the final head's distribution (distillation or the estimator's target)."""
        return self.exit_distillation_weight > 0 or self.exit_estimator

    @property
    def weights(self) -> list[float]:
        return list(self.exit_layer_weight) or [1.0] * len(self.exit_layer_nums)

    @property
    def weight_inits(self) -> list[float]:
        return list(self.exit_layer_weight_init) or [0.0] * len(self.exit_layer_nums)

    @property
    def temperatures(self) -> list[float]:
        return list(self.exit_layer_temperature) or [1.0] * len(self.exit_layer_nums)

    def temperature(self, layer: int) -> float:
        return self.temperatures[list(self.exit_layer_nums).index(layer)]

    def validate(self, num_layers: int) -> "EarlyExitConfig":
        """Check the exits against the model depth; return self."""
        exits = list(self.exit_layer_nums)
        for layer in exits:
            require(
                isinstance(layer, int) and 1 <= layer <= num_layers,
                f"--exit-layer-nums: layer {layer!r} is outside 1..--num-layers ({num_layers}); "
                "exit layer numbers start from 1",
            )
        require(
            exits == sorted(set(exits)),
            f"--exit-layer-nums must be ascending without duplicates, got {exits}",
        )
        self._validate_lists(len(exits))
        require(
            self.exit_layer_weight_warmup_iters >= 0,
            f"--exit-layer-weight-warmup-iters must be >= 0, got {self.exit_layer_weight_warmup_iters}",
        )
        require(
            self.exit_layer_weight_warmup_style in ("linear", "cosine"),
            f"--exit-layer-weight-warmup-style must be linear or cosine, got {self.exit_layer_weight_warmup_style!r}",
        )
        if self.use_exit_mlp:
            require(bool(exits), "--use-exit-mlp needs at least one exit (--exit-layer-nums)")
            require(
                not self.pre_exit,
                "--use-exit-mlp cannot be combined with --pre-exit: the branch MLP sits beside the layer's MLP; "
                "use a post exit on the previous layer instead",
            )
        self._validate_ours(bool(exits))
        return self

    def _validate_ours(self, has_exits: bool) -> None:
        for flag, on in (("--use-exit-linear", self.use_exit_linear), ("--exit-estimator", self.exit_estimator),
                         ("--exit-vocab-size", self.exit_vocab_size > 0)):
            require(not on or has_exits, f"{flag} needs at least one exit (--exit-layer-nums)")
        require(self.exit_estimator_hidden >= 1,
                 f"--exit-estimator-hidden must be a positive integer, got {self.exit_estimator_hidden}")
        require(self.exit_estimator_loss_weight >= 0,
                 f"--exit-estimator-loss-weight must be >= 0, got {self.exit_estimator_loss_weight}")
        require(self.exit_vocab_size >= 0, f"--exit-vocab-size must be >= 0 (0: none), got {self.exit_vocab_size}")
        require(0.0 <= self.exit_distillation_weight <= 1.0,
                 f"--exit-distillation-weight must lie in [0, 1], got {self.exit_distillation_weight}")
        require(self.exit_distillation_top_k >= 1,
                 f"--exit-distillation-top-k must be a positive integer, got {self.exit_distillation_top_k}")
        require(self.exit_distillation_temperature > 0,
                 f"--exit-distillation-temperature must be positive, got {self.exit_distillation_temperature}")

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks of the model's parts against the (unpadded) vocabulary."""
        require(self.exit_vocab_size <= vocab_size,
                 f"--exit-vocab-size ({self.exit_vocab_size}) exceeds the vocabulary ({vocab_size})")

    def _validate_lists(self, n: int) -> None:
        for flag, values in (
            ("--exit-layer-weight", self.exit_layer_weight),
            ("--exit-layer-weight-init", self.exit_layer_weight_init),
            ("--exit-layer-temperature", self.exit_layer_temperature),
        ):
            require(
                len(values) in (0, n),
                f"{flag} has {len(values)} values but --exit-layer-nums has {n}; give one per exit or none",
            )
        for t in self.temperatures:
            require(t > 0, f"--exit-layer-temperature values must be positive, got {t}")
        for w in self.weights + self.weight_inits:
            require(w >= 0, f"--exit-layer-weight / --exit-layer-weight-init must be >= 0, got {w}")
