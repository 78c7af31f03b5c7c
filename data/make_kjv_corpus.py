"""Turn the `bible` program's plain dump of the King James Version into the bundled corpus files.

Input: the output of `bible -p <dir> -l0 "Gen1:1-Rev22:21"` (Debian bible-kjv + bible-kjv-text), where a
chapter starts with a "Book N" line and each verse is a line "  <number> <text>".
Output (see data/README.md): one JSON document per chapter, {"text": "Book N\\n<verse>\\n<verse>..."} with the
verse numbers dropped, written as corpus/kjv.jsonl.gz (all chapters), corpus/kjv_sample.jsonl and
corpus/kjv_sample.txt (the first few chapters; the .txt separates documents by one blank line).
The gzip header carries no timestamp or name so that rebuilding gives identical bytes.
"""

import argparse
import gzip
import json
import re
from pathlib import Path

_VERSE = re.compile(r"^ +\d+ (.*)$")


def parse_chapters(dump: str) -> list[str]:
    chapters: list[list[str]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse:
            if not chapters:
                raise ValueError(f"verse before the first chapter heading: {line!r}")
            chapters[-1].append(verse.group(1).strip())
        else:
            chapters.append([line.strip()])
    return ["\n".join(lines) for lines in chapters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", help="text file written by the bible program")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "corpus"))
    parser.add_argument("--sample-chapters", type=int, default=4)
    args = parser.parse_args()
    chapters = parse_chapters(Path(args.dump).read_text(encoding="utf-8"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": c}) + "\n" for c in chapters).encode("utf-8")
    with open(out / "kjv.jsonl.gz", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
            gz.write(lines)
    sample = chapters[: args.sample_chapters]
    (out / "kjv_sample.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in sample), encoding="utf-8")
    (out / "kjv_sample.txt").write_text("\n\n".join(sample) + "\n", encoding="utf-8")
    print(f"{len(chapters)} chapters, {len(lines)} bytes of JSON lines")


if __name__ == "__main__":
    main()
