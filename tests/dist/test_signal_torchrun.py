"""``--exit-signal-handler`` under the real launcher: torchrun, 2 ranks, a real ``.bin``/``.idx`` dataset read
by DataLoader workers (``--num-workers 2``), and SIGTERM delivered to every process of the job at once, as
``scancel`` and preemption do (torchrun itself also forwards it to each rank's process group). The ranks
must agree, save, exit 0, and a resumed run must continue from the saved iteration."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron.data.indexed_dataset import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "pretrain_early_exit_gpt.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# Each rank runs under a shell that records its exit status; the trap makes the shell outlive the SIGTERM
# (it then runs after python returns) while python and its workers still see the signal's default disposition.
RECORD_RC = 'trap : TERM; "$0" "$@"; echo $? > "$RC_DIR/rc.$RANK"'
ITERATION = re.compile(r"^ iteration +(\d+)/ +\d+ \| consumed samples: +(\d+) \|.*", re.M)


def _argv(data: str, ckpt: str, *extra: str) -> list[str]:
    return ["--data-path", data, "--split", "98,2,0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--exit-layer-nums", "1",
            "--pipeline-model-parallel-size", "2", "--num-workers", "2", "--train-iters", "2000",
            "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000", "--save", ckpt,
            "--save-interval", "1000", "--exit-signal-handler", *extra]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the launcher, the rank shells, the ranks, their workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _launch(tmp_path, name: str, argv: list[str]):
    rc_dir = tmp_path / f"rc_{name}"
    rc_dir.mkdir()
    log = open(tmp_path / f"{name}.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT, "RC_DIR": str(rc_dir)}
    proc = subprocess.Popen([*TORCHRUN, "--no-python", "bash", "-c", RECORD_RC, sys.executable, ENTRY, *argv],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log, rc_dir


def _finish(proc, log, rc_dir, timeout: float = 150) -> tuple[str, list[str]]:
    """Wait for the launcher; (its output, the ranks' exit statuses)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    out = log.read()
    log.close()
    return out, [(rc_dir / f"rc.{r}").read_text().strip() if (rc_dir / f"rc.{r}").exists() else "missing"
                 for r in range(2)]


def _tracker(ckpt) -> str:
    return (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_to_every_process_saves_with_dataloader_workers_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    data = str(tmp_path / "tokens")
    write_dataset(data, [rng.integers(0, 63, rng.integers(20, 80)) for _ in range(200)], np.uint16)
    ckpt = tmp_path / "ckpt"

    proc, log, rc_dir = _launch(tmp_path, "signalled", _argv(data, str(ckpt)))
    deadline = time.time() + 150
    while proc.poll() is None and time.time() < deadline:
        log.seek(0)
        if re.search(r"^ iteration +3/", log.read(), re.M):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be signalled"
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out, rcs = _finish(proc, log, rc_dir)
    assert "killed by signal" not in out, out[-3000:]
    assert rcs == ["0", "0"], out[-3000:]
    saved = int(_tracker(ckpt))
    steps = [int(i) for i, _ in ITERATION.findall(out)]
    assert 3 <= saved == steps[-1] < 2000
    assert f"exiting at iteration {saved} (signal)" in out

    # Resume (workers again) and stop two iterations later: the data position and the iteration continue.
    stop = saved + 2
    proc, log, rc_dir = _launch(tmp_path, "resumed", _argv(data, str(ckpt), "--load", str(ckpt),
                                                            "--exit-interval", str(stop)))
    out, rcs = _finish(proc, log, rc_dir)
    assert rcs == ["0", "0"], out[-3000:]
    assert [(int(i), int(c)) for i, c in ITERATION.findall(out)] == [(saved + 1, 8 * (saved + 1)), (stop, 8 * stop)]
    assert _tracker(ckpt) == str(stop)
