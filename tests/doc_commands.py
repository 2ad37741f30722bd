"""The commands of a documented recipe, for the test that runs it: the shell block of a doc preceded by
`<!-- run by tests/test_X.py -->` (tests/test_docs.py checks that such a test exists and names the doc)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path


def documented(doc: Path, runner: str) -> list[list[str]]:
    """Each command of the one block in `doc` marked as run by `runner`, split into words as the shell would
    (continuation lines joined, comments dropped)."""
    text = doc.read_text()
    marker = f"<!-- run by {runner} -->"
    if text.count(marker) != 1:
        raise AssertionError(f"{doc}: expected one block marked {marker!r}, found {text.count(marker)}")
    block = re.match(r"\s*```[a-z]+\n(.*?)^```", text.split(marker, 1)[1], re.S | re.M)
    if block is None:
        raise AssertionError(f"{doc}: no fenced block right after {marker!r}")
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands
