"""EE-Tuning's train mode (issue 14, item 8): one rule, by parameter ownership -- a module drops out iff
every parameter it holds trains, a module holding none follows its parent -- so every exit variant (exit
MLP branch, exit block) keeps its dropout while the frozen backbone runs without any."""

import pytest
import torch

from megatron.config import EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import tiny_config
from megatron.training.setup import _freeze_backbone, set_train_mode

VARIANTS = {"exit-mlp": dict(use_exit_mlp=True), "exit-block": dict(use_exit_block=True),
            "exit-norm-untied": dict(use_exit_norm=True, untie_exit_output_weights=True)}


def _model(tune: bool, **exit_flags) -> EarlyExitGPTModel:
    config = tiny_config(None, num_layers=2, vocab_size=64, make_vocab_size_divisible_by=16, seq_length=8,
                         hidden_dropout=0.5, attention_dropout=0.5, seed=3)
    model = EarlyExitGPTModel(config, EarlyExitConfig(exit_layer_nums=[1], **exit_flags), state=ParallelState.single())
    if tune:
        _freeze_backbone([model])
    set_train_mode([model], tune)
    return model


def _forward(model, seed: int):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], position_ids=torch.arange(8).expand(2, 8), labels=ids[:, 1:])
    return out.output, out.exit_losses[1]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tuning_drops_out_in_every_exit_and_nowhere_in_the_backbone(variant):
    model = _model(True, **VARIANTS[variant])
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params:
            assert module.training == all(p.requires_grad for p in params), name
    final_a, exit_a = _forward(model, 1)
    final_b, exit_b = _forward(model, 2)
    assert torch.equal(final_a, final_b), "the frozen backbone must run without dropout"
    if variant != "exit-norm-untied":  # a norm and a projection have no dropout of their own
        assert not torch.equal(exit_a, exit_b), f"{variant}: the exit's dropout must stay on"


def test_full_training_drops_out_everywhere():
    model = _model(False, use_exit_mlp=True, use_exit_block=True)
    assert all(module.training for module in model.modules())
    assert not torch.equal(_forward(model, 1)[0], _forward(model, 2)[0])
