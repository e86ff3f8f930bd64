"""Print one of the README's two commands, as written there: `setup` or `test`.

CI runs what the README says rather than a copy of it that could drift.
"""

import re
import sys
from pathlib import Path

text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
which = sys.argv[1]
if which == "setup":
    found = re.search(r"^python3 -m venv \.venv && .*$", text, flags=re.M)
elif which == "test":
    found = re.search(r"Run the tests[^`]*`([^`]*pytest[^`]*)`", text)
else:
    sys.exit(f"usage: {sys.argv[0]} setup|test")
if found is None:
    sys.exit(f"the README has no {which} command")
print(found.group(1) if which == "test" else found.group(0))
