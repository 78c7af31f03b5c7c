"""Package boundaries of checkpointing: inference and evaluation import nothing from ``megatron.training``,
the checkpoint file formats do not depend on training, and the model of a rank is built in one place."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path: pathlib.Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def _files(*packages: str) -> list[pathlib.Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("package", ["megatron/text_generation", "megatron/evaluation", "megatron/checkpoint"])
def test_no_training_imports(package):
    # The run configuration lives in megatron/run_config.py: nothing of training is reachable from these.
    bad = []
    for path in _files(package):
        rel = str(path.relative_to(ROOT))
        for name in _imports(path):
            if name == "megatron.training" or name.startswith("megatron.training."):
                bad.append(f"{rel}: {name}")
    assert not bad, bad


def test_checkpoint_moved_out_of_training():
    assert not (ROOT / "megatron/training/checkpoint").exists()
    assert (ROOT / "megatron/checkpoint/__init__.py").is_file()


def test_the_model_of_a_rank_is_built_in_one_place():
    """Training, the server, evaluation and the tools construct EarlyExitGPTModel chunks only through
    megatron/checkpoint/model_loader.py (tools/checkpoint/verify.py runs every stage of a FULL dict in one
    process, which is not a rank's model). ``megatron/testing`` is the tests' support code: its tiny models
    are built directly, as the tests build them."""
    sites = []
    for path in _files("megatron", "tools") + [ROOT / "pretrain_early_exit_gpt.py"]:
        if path.is_relative_to(ROOT / "megatron" / "testing"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "EarlyExitGPTModel":
                sites.append(str(path.relative_to(ROOT)))
    assert sorted(set(sites)) == ["megatron/checkpoint/model_loader.py", "tools/checkpoint/verify.py"]
