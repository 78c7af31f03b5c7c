"""Merge several indexed datasets (``.bin``/``.idx`` pairs) into one, as Megatron's tool does.

Every prefix in ``--input`` (a directory) that has both files is appended in sorted file-name order;
all of them must share a dtype. The sequences and document boundaries are kept as they are.

    python tools/merge_datasets.py --input data/shards --output-prefix data/merged_text_document
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError  # noqa: E402

__all__ = ["main", "find_prefixes", "merge"]


def find_prefixes(directory: str) -> list[str]:
    """Prefixes of the complete ``.bin``/``.idx`` pairs in ``directory``, sorted by name."""
    names = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".idx"))
    return [os.path.join(directory, n) for n in names if IndexedDataset.exists(os.path.join(directory, n))]


def merge(prefixes: list[str], output_prefix: str) -> None:
    if not prefixes:
        raise IndexedDatasetError("nothing to merge: no <prefix>.bin/<prefix>.idx pairs were found")
    builder = IndexedDatasetBuilder(output_prefix, IndexedDataset(prefixes[0]).dtype)
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
    except BaseException:
        builder.discard()
        raise
    builder.finalize()


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=str, required=True, help="Directory holding the .bin/.idx pairs to merge.")
    parser.add_argument("--output-prefix", type=str, required=True, help="Writes <prefix>.bin and <prefix>.idx.")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a directory")
    out = os.path.abspath(args.output_prefix)
    prefixes = [p for p in find_prefixes(args.input) if os.path.abspath(p) != out]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    merge(prefixes, args.output_prefix)
    return prefixes


if __name__ == "__main__":
    sys.exit(run_cli(main))
