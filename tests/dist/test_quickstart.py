"""``bash examples/quickstart.sh`` as a new user runs it, shrunk through its environment knobs: it tokenizes
the bundled corpus, trains the pp = 2 early-exit GPT under torchrun, reports every exit's held-out loss,
prints the threshold table with early exits firing, and leaves a checkpoint that the text-generation
server (torchrun, 2 processes) opens and the CLI gets continuations from."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHRINK = {"QUICKSTART_ITERS": "8", "QUICKSTART_HIDDEN": "32", "QUICKSTART_SEQ": "64", "QUICKSTART_VOCAB": "1000",
          "QUICKSTART_THRESHOLDS": "1.0,0.0", "QUICKSTART_TOKENS": "6", "QUICKSTART_REPEATS": "1"}


def _env(work) -> dict:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **SHRINK, "QUICKSTART_WORK": str(work),
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _printed(log: str, tool: str) -> tuple[str, str]:
    """(directory, command) of the line the script printed to run ``tool``."""
    found = re.search(rf"^ +cd (\S+) && (\S+ .*{re.escape(tool)} .*\S) *$", log, re.M)
    assert found, f"no {tool} command printed:\n{log[-2000:]}"
    return found.group(1), found.group(2)


def _serve_and_ask(work, log: str) -> str:
    """Run the server and the CLI with the commands the script printed (a free port instead of 5000, and
    threshold 0 so that every token leaves at the first exit); -> the CLI's output."""
    cwd, serve = _printed(log, "tools/run_early_exit_text_generation_server.py")
    _, cli = _printed(log, "tools/text_generation_cli.py")
    assert "--port 5000" in serve and "--threshold 0.6" in cli
    server = subprocess.Popen(["bash", "-c", "exec " + serve.replace("--port 5000", "--port 0")], cwd=cwd,
                              env=_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        address = next(filter(None, map(re.compile(r"serving on (http://\S+)").search, server.stderr)), None)
        assert address, "the server exited without serving"
        cli = cli.replace("http://127.0.0.1:5000", address.group(1)).replace("--threshold 0.6", "--threshold 0.0")
        ask = subprocess.run(["bash", "-c", cli], cwd=cwd, env=_env(work), capture_output=True, text=True, timeout=60)
        assert ask.returncode == 0, ask.stderr[-2000:]
        return ask.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stderr.close()


@pytest.mark.slow
def test_quickstart_trains_sweeps_and_leaves_a_servable_checkpoint(tmp_path):
    work = tmp_path / "qs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And Moses said\nIn the beginning\n")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], capture_output=True, text=True,
                         env={**_env(work), "QUICKSTART_PROMPTS": str(prompts)}, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout

    train = [line for line in log.splitlines() if line.startswith(" iteration")]
    assert len(train) >= 4 and "| early loss [2]: " in train[-1] and "| early loss [4]: " in train[-1]
    assert "learning rate" not in train[-1]  # the console drops the constant fields; train.log keeps them
    assert "learning rate" in (work / "train.log").read_text()
    losses = [float(re.search(r"\| lm loss: (\S+) \|", line).group(1)) for line in train]
    assert losses[-1] < losses[0] - 0.05, losses
    for layer in ("2", "4", "6 (final)"):
        assert re.search(rf"exit after layer {re.escape(layer)} +loss \d+\.\d+ +perplexity", log), layer

    table = json.loads((work / "sweep.json").read_text())
    points = {p["threshold"]: p for p in table["points"]}
    assert set(points) == {1.0, 0.0} and table["config"]["exit_layers"] == [2, 4]
    # threshold 0 takes every token at the first exit; 1.0 keeps (practically) all at full depth
    assert points[0.0]["mean_exit_layer"] == 2.0 and points[0.0]["exit_share"] == {"2": 1.0}
    assert points[1.0]["mean_exit_layer"] > points[0.0]["mean_exit_layer"]
    assert table["full_depth"]["mean_exit_layer"] == 6.0 and table["full_depth"]["agreement"] == 1.0
    # a row may end in a timing note ("slower than full depth"): tokens/s of a tiny run is noise
    assert re.search(r"^ +0\.00 +\d+\.\d +\d+\.\d\dx +2\.00 +\d+\.\d% +100/0/0(  \(.+\))?$", log, re.M), log[-2000:]
    assert table["config"]["prompts"] == ["And Moses said", "In the beginning"]
    assert "continuations of 'And Moses said':" in log

    answer = _serve_and_ask(work, log)
    assert "exits [layer 2: 100%]" in answer, answer  # threshold 0: every token leaves at the first exit
