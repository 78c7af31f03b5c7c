"""tools/run_early_exit_text_generation_server.py as users run it: a process that serves until SIGTERM
and then exits cleanly; and the refusal to serve random weights by accident."""

import json
import os
import re
import signal
import subprocess
import sys
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
