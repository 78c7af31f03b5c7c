"""EarlyExitGPTModel: the GPT / Llama model of one (pipeline stage, virtual chunk), with exits.

One instance per (stage, chunk) of a :class:`~megatron.model.partition.Partition`: the embedding on the
first chunk, final norm and output head on the last, exit heads on the chunks owning exit layers. With
no exits it is exactly a plain GPT. ``state_dict()`` is Megatron / EE-LLM's per-rank ``model`` dict.

Shared ("tied") output projections. The exits' projection, when tied, is the model's own output
projection: the word embedding with tied embeddings, else ``language_model.output_layer``. Chunks that
need it but do not own it hold a copy: ``word_embeddings_for_head`` (EE-LLM's key) for the embedding,
``output_layer_for_exits`` (our key; EE-LLM cannot tie exits to an untied head) for the output layer.
Copies are initialised identically by the seeded init (no communication); after backward,
:func:`~megatron.core.distributed.finalize.reduce_tied_grads` sums their gradients over the holders, so
every copy takes the same step.

Training forward -> :class:`StageOutput`; the cached inference forward is :meth:`EarlyExitGPTModel.infer`
(see ``megatron/model/inference.py``).

EE-Tuning. ``frozen_backbone`` (set when the backbone is frozen) runs the backbone without autograd. With
``teacher=True`` the forward defers the exit losses: it returns each exit's :class:`ExitState` and, on the
head chunk, the final head's :class:`~megatron.model.exit_objective.TeacherTargets` (computed once, without
gradients); :meth:`EarlyExitGPTModel.exit_objective` then gives the exits' terms once the targets are there
(on another stage they arrive through the pipeline).

Inference pieces of ours: :meth:`EarlyExitGPTModel.exit_estimate` (``--exit-estimator``) and the buffer
``exit_vocab`` (``--exit-vocab-size K``: state-dict key ``exit_vocab``, int64 ``[K]``, sorted token ids of
a reduced-vocabulary exit projection, on every chunk owning exits; ``-1`` entries until
``tools/checkpoint/checkpoint_converter.py --conversion-type exit-vocab`` fills it; training ignores it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding, gather_from_sequence_parallel_region
from megatron.core.transformer import RotaryEmbedding, SeededInit, SkipInit

from .exit_heads import EarlyExitTransformerLayer, exit_confidence, lm_logits, token_losses
from .exit_objective import ExitTerms, TeacherTargets, exit_terms, teacher_targets
from .language_model import LanguageModel, output_projection
from .partition import Partition, partition as make_partition

__all__ = ["StageOutput", "ExitState", "EarlyExitGPTModel", "tied_weight_holders", "EXIT_VOCAB_KEY"]

WORD_EMBEDDINGS, OUTPUT_LAYER = "word_embeddings", "output_layer"
EXIT_VOCAB_KEY = "exit_vocab"


@dataclass
class ExitState:
    """An exit whose losses wait for the teacher: its pre-projection ``hidden`` ``[s(/tp), b, h]`` (with
    the graph of the exit's parameters) and its layer's detached ``trunk`` state (the estimator's input)."""

    hidden: torch.Tensor
    trunk: torch.Tensor


@dataclass
class StageOutput:
    """``output``: hidden ``[s(/tp), b, h]`` on non-head chunks; on the head chunk per-token final CE
    ``[b, s]`` (or vocab-parallel logits ``[b, s, V/tp]`` without labels, or the teacher's targets with
    ``teacher=True``); None when the forward stopped after the last exit. ``exit_losses``: per-token
    exit CE ``[b, s]`` by exit layer number (tempered, times confidence with dynamic weights), unweighted.
    ``exit_logits``: vocab-parallel exit logits ``[b, s, V/tp]`` when no labels were given.
    ``exit_states``: the exits of a ``teacher=True`` forward (see :meth:`EarlyExitGPTModel.exit_objective`)."""

    output: torch.Tensor | TeacherTargets | None
    exit_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    exit_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    exit_states: dict[int, ExitState] = field(default_factory=dict)


def tied_weight_holders(part: Partition, config: ModelConfig, ee: EarlyExitConfig) -> dict[str, list[tuple[int, int]]]:
    """For each shared output projection, the sorted (stage, chunk) pairs holding a copy of it
    (only entries with more than one holder need gradient synchronisation)."""
    head = next(s for s in part.all_specs() if s.has_head)
    exit_chunks = [(s.stage, s.chunk) for s in part.all_specs() if s.exits]
    tied_exits = not ee.untie_exit_output_weights
    if not config.untie_embeddings_and_output_weights:
        holders = {(0, 0), (head.stage, head.chunk)} | (set(exit_chunks) if tied_exits else set())
        return {WORD_EMBEDDINGS: sorted(holders)}
    if tied_exits and exit_chunks:
        return {OUTPUT_LAYER: sorted({(head.stage, head.chunk), *exit_chunks})}
    return {}


def _recipe(config: ModelConfig, initialize: bool | str):
    if initialize == "skip":
        return SkipInit()
    if initialize is True or initialize is False:
        return SeededInit(config.seed, config.init_method_std, config.num_layers,
                          config.use_cpu_initialization) if initialize else None
    raise ValueError(f"initialize must be True, False or 'skip', got {initialize!r}")


class EarlyExitGPTModel(nn.Module):
    """``initialize``: ``True`` draws the seeded initial weights (on the model's device), ``False`` zeros
    them, ``"skip"`` leaves them uninitialised for a strict checkpoint load that follows at once."""

    def __init__(self, config: ModelConfig, ee: EarlyExitConfig | None = None, *, state, partition: Partition | None = None,
                 stage: int | None = None, chunk: int = 0, rng_tracker=None, initialize: bool | str = True,
                 layers_per_stage=None):
        super().__init__()
        ee = ee if ee is not None else EarlyExitConfig()
        config.validate(state.tp)
        ee.validate(config.num_layers)
        ee.validate_vocab(config.vocab_size)
        if partition is None:
            partition = make_partition(config.num_layers, state.pp, state.dims.chunks, ee.exit_layer_nums,
                                       layers_per_stage)
        if partition.num_layers != config.num_layers or list(partition.exit_layers) != list(ee.exit_layer_nums):
            raise ConfigError("the partition was built for other --num-layers / --exit-layer-nums than the model")
        self.config, self.ee, self.state, self.partition = config, ee, state, partition
        self.spec = partition.spec(state.pp_rank if stage is None else stage, chunk)
        self.vocab = config.padded_vocab(state.tp)
        self.sequence_parallel = config.sequence_parallel and state.tp > 1
        recipe = _recipe(config, initialize)
        self.language_model = LanguageModel(config, ee, state=state, spec=self.spec, vocab=self.vocab, recipe=recipe,
                                            rng_tracker=rng_tracker)
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base)
        self._build_copies(recipe)
        self.frozen_backbone = False  # EE-Tuning sets it with the backbone's requires_grad (training/setup.py)
        self._exit_layers = {layer.layer_number: layer for layer in self.language_model.encoder.layers
                             if isinstance(layer, EarlyExitTransformerLayer)}
        if ee.exit_vocab_size and self.spec.exits:
            self.register_buffer(EXIT_VOCAB_KEY, torch.full((ee.exit_vocab_size,), -1, dtype=torch.long,
                                                            device=state.device))

    # ------------------------------------------------------------------ shared projections
    def _build_copies(self, recipe) -> None:
        me = (self.spec.stage, self.spec.chunk)
        holders = tied_weight_holders(self.partition, self.config, self.ee)
        self.word_embeddings_for_head = None
        self.output_layer_for_exits = None
        if me in holders.get(WORD_EMBEDDINGS, ()) and not self.spec.has_embedding:
            init = None if recipe is None else recipe.normal(0, "embedding.word_embeddings.weight")
            self.word_embeddings_for_head = VocabParallelEmbedding(
                self.vocab, self.config.hidden_size, state=self.state, init_method=init,
                params_dtype=self.config.params_dtype)
            self.word_embeddings_for_head.weight.shared = True
        if me in holders.get(OUTPUT_LAYER, ()) and not self.spec.has_head:
            self.output_layer_for_exits = output_projection(
                self.config, self.state, self.vocab, recipe, 0, "output_layer.weight")
            self.output_layer_for_exits.weight.shared = True

    def tied_parameters(self) -> dict[str, nn.Parameter]:
        """This chunk's copies of shared projections, by name (see :func:`tied_weight_holders`)."""
        me = (self.spec.stage, self.spec.chunk)
        out = {}
        for name, holders in tied_weight_holders(self.partition, self.config, self.ee).items():
            if me in holders:
                out[name] = self._shared_weight(name)
        return out

    def tied_stages(self) -> dict[str, list[int]]:
        """For each shared projection, the sorted stages holding it (for ``ParallelState.new_stage_group``)."""
        return {name: sorted({s for s, _ in holders})
                for name, holders in tied_weight_holders(self.partition, self.config, self.ee).items()}

    def _shared_weight(self, name: str) -> nn.Parameter:
        lm = self.language_model
        if name == WORD_EMBEDDINGS:
            return lm.embedding.word_embeddings.weight if lm.embedding is not None else self.word_embeddings_for_head.weight
        return lm.output_layer.weight if lm.output_layer is not None else self.output_layer_for_exits.weight

    def output_weight(self) -> nn.Parameter:
        """The final head's projection ``[V/tp, h]``."""
        return self._shared_weight(OUTPUT_LAYER if self.config.untie_embeddings_and_output_weights else WORD_EMBEDDINGS)

    def exit_weight(self, layer: int) -> nn.Parameter:
        if self.ee.untie_exit_output_weights:
            return self.language_model.exit_output_layer[self.spec.exits.index(layer)].weight
        return self.output_weight()

    # ------------------------------------------------------------------ forward
    def stage_input(self, input_ids, position_ids, hidden_states, offset: int = 0):
        """-> (hidden ``[s(/tp), b, h]``, position ids ``[b, s]``, RoPE angles or None). The first chunk
        embeds ``input_ids`` unless ``hidden_states`` are given (inference resuming at a later layer)."""
        embed = self.spec.has_embedding and hidden_states is None
        if embed:
            if input_ids is None:
                raise ValueError("the first chunk needs input_ids")
            b, s = input_ids.shape
        else:
            if hidden_states is None:
                raise ValueError(f"chunk (stage {self.spec.stage}, chunk {self.spec.chunk}) needs hidden_states")
            s = hidden_states.shape[0] * (self.state.tp if self.sequence_parallel else 1)
            b = hidden_states.shape[1]
        if position_ids is None:
            position_ids = torch.arange(offset, offset + s, device=self.state.device).unsqueeze(0).expand(b, s)
        h = self.language_model.embedding(input_ids, position_ids) if embed else hidden_states
        rope = None if self.rotary is None else self.rotary.cos_sin(position_ids, dtype=h.dtype)
        return h, position_ids, rope

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, labels=None,
                hidden_states=None, *, teacher: bool = False, stop_after_exits: bool = False) -> StageOutput:
        """Training / full-sequence forward of this chunk (see :class:`StageOutput`). ``teacher``: defer
        the exit losses to :meth:`exit_objective` (the head chunk computes the targets). ``stop_after_exits``:
        nothing after this chunk's last exit runs (an EE-Tuning stream ending here)."""
        backbone = torch.no_grad() if self.frozen_backbone else contextlib.nullcontext()
        with backbone:
            h, _, rope = self.stage_input(input_ids, position_ids, hidden_states)
        enc = self.language_model.encoder.run(h, attention_mask, rope, frozen=self.frozen_backbone,
                                              stop_after_exits=stop_after_exits)
        out = StageOutput(enc.hidden)
        group = self.state.tp_group
        for layer, h_exit in enc.exit_hidden.items():
            if teacher:
                out.exit_states[layer] = ExitState(h_exit, enc.exit_trunk[layer])
                continue
            logits = lm_logits(h_exit, self.exit_weight(layer), group, self.sequence_parallel)
            if labels is None:
                out.exit_logits[layer] = logits.transpose(0, 1)
                continue
            logits = logits / self.ee.temperature(layer)
            loss = token_losses(logits, labels, group)
            if self.ee.use_dynamic_exit_layer_weight:
                loss = loss * exit_confidence(logits, group).t()
            out.exit_losses[layer] = loss
        if not self.spec.has_head or stop_after_exits:
            return out
        with torch.no_grad() if teacher else backbone:
            logits = lm_logits(enc.hidden, self.output_weight(), group, self.sequence_parallel)
            if teacher:
                ee = self.ee
                out.output = teacher_targets(logits, ee.exit_distillation_top_k, ee.exit_distillation_temperature,
                                             group, min(self.config.vocab_size, self.vocab))
            else:
                out.output = logits.transpose(0, 1) if labels is None else token_losses(logits, labels, group)
        return out

    def exit_objective(self, states: dict[int, ExitState], labels: torch.Tensor,
                       targets: TeacherTargets) -> dict[int, ExitTerms]:
        """Each deferred exit's terms (``megatron/model/exit_objective.py``) once the teacher's targets
        are known; back-propagating them reaches the exit parameters only."""
        ee, group = self.ee, self.state.tp_group
        terms = {}
        for layer, st in sorted(states.items()):
            logits = lm_logits(st.hidden, self.exit_weight(layer), group, self.sequence_parallel)
            estimator = None
            if ee.exit_estimator:
                trunk = st.trunk
                if self.sequence_parallel:  # detached: the gather has no backward
                    trunk = gather_from_sequence_parallel_region(trunk, group)
                estimator = self.exit_estimate(layer, trunk).t()
            terms[layer] = exit_terms(
                logits, labels, targets, group, weight=ee.exit_distillation_weight,
                temperature=ee.exit_distillation_temperature, exit_temperature=ee.temperature(layer),
                dynamic=ee.use_dynamic_exit_layer_weight, estimator_logits=estimator)
        return terms

    def exit_estimate(self, layer: int, trunk: torch.Tensor) -> torch.Tensor:
        """Exit ``layer``'s estimator: logits ``[...]`` (fp32) of P(its top-1 == the final head's top-1),
        from its layer's trunk state ``[..., h]`` -- the layer's output (post exit) or input (pre exit),
        before any exit part; e.g. ``[rows, h]`` -> ``[rows]``. Input is detached: no gradient reaches
        the model through it. Needs ``--exit-estimator``."""
        exit_layer = self._exit_layers.get(layer)
        if exit_layer is None or exit_layer.exit_estimator is None:
            raise ValueError(f"this chunk has no estimator at layer {layer} (exits {list(self.spec.exits)}; "
                             "estimators exist with --exit-estimator)")
        return exit_layer.exit_estimator(trunk.detach())

    def exit_vocabulary(self) -> torch.Tensor:
        """The sorted token ids ``[K]`` of the reduced-vocabulary exit projection (``exit_vocab``)."""
        vocab = getattr(self, EXIT_VOCAB_KEY, None)
        if vocab is None:
            raise ValueError("this chunk has no exit vocabulary: it needs exits and --exit-vocab-size K")
        if bool((vocab < 0).any()):
            raise ValueError("the exit vocabulary is not filled: run tools/checkpoint/checkpoint_converter.py "
                             "--conversion-type exit-vocab --exit-vocab-size K --data-path PREFIX on the checkpoint")
        return vocab

    def infer(self, *args, **kwargs):
        """Cached inference forward; see :func:`megatron.model.inference.inference_forward`."""
        from .inference import inference_forward

        return inference_forward(self, *args, **kwargs)
