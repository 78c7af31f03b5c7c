"""tools/run_early_exit_text_generation_server.py as users run it: a process that serves until SIGTERM
and then exits cleanly; the refusal to serve random weights by accident; and a 2-process server whose
worker rank is killed: the next request is a 500, /health says "failed" and the server exits with 1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from tools import run_early_exit_text_generation_server as tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "run_early_exit_text_generation_server.py")
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--exit-layer-nums 1 --tokenizer-type NullTokenizer --vocab-size 40 --device cpu").split()


def test_refuses_without_checkpoint(capsys):
    assert tool.main(MODEL) == 2
    assert "--random-weights" in capsys.readouterr().err


def _url_from_log(proc) -> str:
    for line in proc.stderr:
        found = re.search(r"serving on (http://\S+)", line)
        if found:
            return found.group(1)
    pytest.fail("the server never reported its address")


def _answer(url, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, method=method), timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_lost_rank_fails_health_and_exits_nonzero():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        master_port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    cmd = [sys.executable, SCRIPT, *MODEL, "--random-weights", "--port", "0", "--pipeline-model-parallel-size", "2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    logs = [[], []]
    try:
        url = _url_from_log(procs[0])
        for proc, lines in zip(procs, logs):  # keep the logs flowing: a full pipe would block its writer
            threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stderr), daemon=True).start()
        status, out = _answer(url, "PUT", "/api", {"prompts": "1 2", "tokens_to_generate": 3})
        assert status == 200
        procs[1].kill()
        procs[1].wait(timeout=30)
        status, out = _answer(url, "PUT", "/api", {"prompts": "1 2", "tokens_to_generate": 3})
        assert status == 500 and "can no longer agree" in out["error"], out
        status, out = _answer(url, "GET", "/health")  # within the 2 s of grace before the server stops
        assert status == 503 and out["status"] == "failed" and "a rank is lost" in out["reason"]
        assert procs[0].wait(timeout=60) == 1
    except BaseException:
        print("rank 0's log:", "".join(logs[0][-30:]), sep="\n")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_serves_until_sigterm():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    proc = subprocess.Popen([sys.executable, SCRIPT, *MODEL, "--random-weights", "--port", "0"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server never reported its address"
        req = urllib.request.Request(url + "/api", method="PUT",
                                     data=json.dumps({"prompts": "1 2", "tokens_to_generate": 3}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["exit_layers"][0]) <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("the server did not exit on SIGTERM")
        proc.stderr.close()
