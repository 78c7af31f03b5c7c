"""The configuration sections a run is made of: every field says in one line what it means, and every field
has exactly one home section (the Megatron-named ``args`` maps one to one onto them)."""

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing

import pytest

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.optimizer.config import OptimizerConfig
from megatron.run_config import CheckpointConfig, DataConfig, LoggingConfig, ParallelConfig, RunConfig, TrainingConfig

SECTIONS = [ModelConfig, EarlyExitConfig, OptimizerConfig, ParallelConfig, TrainingConfig, DataConfig,
            CheckpointConfig, LoggingConfig]


def _undocumented(cls) -> list[str]:
    """Fields of ``cls`` with neither a comment on their line nor a comment line right above."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    missing = []
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign):
            line = node.lineno
            above = lines[line - 2].strip().startswith("#")
            if line not in comments and not above:
                missing.append(node.target.id)
    return missing


@pytest.mark.parametrize("cls", SECTIONS, ids=[c.__name__ for c in SECTIONS])
def test_every_field_says_what_it_means(cls):
    assert _undocumented(cls) == []


def test_each_field_has_one_home_section():
    homes: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(RunConfig).items():
        for f in dataclasses.fields(cls):
            homes.setdefault(f.name, []).append(section)
    shared = {name: where for name, where in homes.items() if len(where) > 1}
    assert shared == {}
    # The fields that used to live in two sections, in their one home now.
    for name in ("seq_length", "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by", "sequence_parallel",
                 "seed"):
        assert homes[name] == ["model"], name
    assert homes["log_num_zeros_in_grad"] == ["optimizer"]

