"""Write two text files for the quick start, from documentation every Python installation has.

    python examples/sample_text.py sample     # → sample/calib.txt, sample/eval.txt

The text is the Python language reference as ``help()`` shows it (the standard library's
``pydoc_data.topics``): real English prose with some code, and nothing to download. Topics overlap
(``specialnames`` repeats much of ``customization``), so each paragraph is kept once, where it
first appears in alphabetical order of the topics; the paragraphs are then cut into two halves of
about equal size, with no paragraph in both: the first half to
calibrate on (``compress factorize --calib sample/calib.txt``), the second to measure perplexity on
(``compress eval … --data sample/eval.txt``). The files differ between Python releases, which
revise their documentation, and so do the perplexities measured on them.

For your own models, calibrate on text of the domain they will serve; this is only a
self-contained way to see the whole job run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def unique_paragraphs() -> list[str]:
    """The reference's paragraphs, topics in alphabetical order, each paragraph once."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip the documentation from the standard library
        raise SystemExit(f"this Python has no pydoc_data ({e}); use any text files of your own instead") from e
    seen: set[str] = set()
    paragraphs = []
    for name in sorted(topics):
        for paragraph in topics[name].strip().split("\n\n"):
            key = " ".join(paragraph.split())
            if key and key not in seen:
                seen.add(key)
                paragraphs.append(paragraph)
    return paragraphs


def split_halves(paragraphs: list[str]) -> tuple[str, str]:
    """The paragraphs in order, cut where the first half reaches half the characters."""
    total = sum(len(p) for p in paragraphs)
    size = 0
    for i, paragraph in enumerate(paragraphs):
        if size >= total / 2:
            return "\n\n".join(paragraphs[:i]) + "\n", "\n\n".join(paragraphs[i:]) + "\n"
        size += len(paragraph)
    raise ValueError("too few paragraphs to split")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write calib.txt and eval.txt")
    args = parser.parse_args(argv)
    calib, evaluation = split_halves(unique_paragraphs())
    args.folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("calib.txt", calib), ("eval.txt", evaluation)):
        path = args.folder / name
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(text):,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
