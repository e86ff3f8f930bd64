"""Write two text files for the quick start, from documentation every Python installation has.

    python examples/sample_text.py sample     # → sample/calib.txt, sample/eval.txt

The text is the Python language reference as ``help()`` shows it (the standard library's
``pydoc_data.topics``): real English prose with some code, and nothing to download. Topics are
split in alphabetical order into two disjoint halves of about equal size: the first half to
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


def topic_texts() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip the documentation from the standard library
        raise SystemExit(f"this Python has no pydoc_data ({e}); use any text files of your own instead") from e
    return [topics[name].strip() for name in sorted(topics)]


def split_halves(texts: list[str]) -> tuple[str, str]:
    """The texts in order, cut where the first half reaches half the characters."""
    total = sum(len(t) for t in texts)
    first: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        if size >= total / 2:
            return "\n\n".join(first) + "\n", "\n\n".join(texts[i:]) + "\n"
        first.append(text)
        size += len(text)
    raise ValueError("too few texts to split")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write calib.txt and eval.txt")
    args = parser.parse_args(argv)
    calib, evaluation = split_halves(topic_texts())
    args.folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("calib.txt", calib), ("eval.txt", evaluation)):
        path = args.folder / name
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(text):,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
