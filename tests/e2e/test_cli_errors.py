"""One-line errors from every entry point: ``megatron.cli_errors.run_cli`` in-process (what counts as a
refusal, the debug switch, the rank prefix), then each CLI as users start it, given a refusal: one line
``<prog>: error: ...`` on stderr, status 2, no traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megatron import cli_errors
from megatron.cli_errors import DEBUG_ENV, run_cli
from megatron.config import ConfigError
from megatron.data.indexed_dataset import write_dataset
from megatron.model.state_dict_sharding import StateDictError
from megatron.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raises(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [ConfigError("--num-layers must be positive"), CheckpointError("bad tracker"),
                                 StateDictError("missing key 'x'"), FileNotFoundError(2, "No such file", "/a"),
                                 ImportError("pip install gguf")], ids=lambda e: type(e).__name__)
def test_refusals_print_one_line_and_return_2(exc, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(_raises(exc), [], prog="tool.py") == 2
    assert capsys.readouterr().err == f"tool.py: error: {exc}\n"


def test_bugs_keep_their_traceback_and_debug_shows_every_one(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(AssertionError):
        run_cli(_raises(AssertionError("a bug")), [])
    with pytest.raises(RuntimeError):
        run_cli(_raises(RuntimeError("from torch")), [])
    script_error = type("ScriptError", (RuntimeError,), {"__module__": "__main__"})  # a script's own class
    assert cli_errors.is_user_error(script_error("x")) and not cli_errors.is_user_error(RuntimeError("x"))
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        run_cli(_raises(ConfigError("--x")), [])


def test_exit_status_and_rank_prefix(capsys, monkeypatch):
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: {"a": 1}, []) == 0  # entry points that return their results
    assert run_cli(lambda argv: None, []) == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert run_cli(_raises(ValueError("--data-path x not found")), [], prog="p.py") == 2
    assert capsys.readouterr().err == "[rank 3/4] p.py: error: --data-path x not found\n"
    assert cli_errors.error_line(KeyError("k")).endswith("error: k")  # not KeyError's quoted repr


def _cli(*argv, env=None, timeout=120):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    full_env.pop(DEBUG_ENV, None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)


TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
TRAIN = TINY + ["--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2",
                "--num-workers", "0"]


def _one_line(out, prog: str, message: str) -> None:
    """Status 2, no traceback, and the error is one line, the last (log lines may come before it)."""
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert [line for line in lines if ": error: " in line] == lines[-1:], out.stderr[-2000:]
    assert lines[-1].startswith(f"{prog}: error: ") and message in lines[-1], out.stderr[-2000:]


@pytest.fixture
def corrupt(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [np.arange(5)], np.uint16)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"xx")
    return prefix


def test_training_refusals_of_data_files(tmp_path, corrupt):
    _one_line(_cli("pretrain_early_exit_gpt.py", *TRAIN, "--data-path", str(tmp_path / "none")),
              "pretrain_early_exit_gpt.py", f"{tmp_path / 'none'}.idx not found")
    _one_line(_cli("pretrain_early_exit_gpt.py", *TRAIN, "--data-path", corrupt),
              "pretrain_early_exit_gpt.py", "the pair is truncated or does not belong together")


def test_tools_refusals(tmp_path, corrupt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1"}\n[1]\n')
    _one_line(_cli("tools/preprocess_data.py", "--input", str(bad), "--output-prefix", str(tmp_path / "o"),
                   "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"), "preprocess_data.py", "bad.jsonl:2: ")
    _one_line(_cli("tools/merge_datasets.py", "--input", str(tmp_path), "--output-prefix", str(tmp_path / "m")),
              "merge_datasets.py", "the pair is truncated")
    _one_line(_cli("tools/checkpoint/util.py", "--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
                   "--load-dir", str(tmp_path / "none"), "--save-dir", str(tmp_path / "s")),
              "util.py", "does not exist")
    _one_line(_cli("tools/request_client.py", "--prompt-file", str(tmp_path / "none.jsonl")),
              "request_client.py", "No such file or directory")


def test_server_and_evaluation_refusals(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _one_line(_cli("tools/run_early_exit_text_generation_server.py", "--random-weights", *TINY, "--port", port),
                  "run_early_exit_text_generation_server.py", "Address already in use")
    _one_line(_cli("-m", "megatron.evaluation", "--task", str(tmp_path / "none.jsonl"), "--", "--random-weights",
                   *TINY), "python -m megatron.evaluation", "no such file")
    _one_line(_cli("tools/sweep_thresholds.py", "--prompts", str(tmp_path / "none.txt"), "--", "--random-weights",
                   *TINY), "sweep_thresholds.py", "no such file")
