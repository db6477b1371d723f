"""Every ```python {.runnable} block of README.md and docs/*.md runs as written: in a fresh process, in
an empty folder, offline, with the repository importable. (The marker is a class in braces because
MkDocs' fences take nothing else after the language; GitHub reads the first word as the language.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BLOCK = re.compile(r"^```python \{\.runnable\}\n(.*?)^```", re.DOTALL | re.MULTILINE)


def runnable_blocks() -> list[tuple[str, str]]:
    """``(file:line, code)`` of every runnable block."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(REPO)}:{line}", match.group(1)))
    return found


def test_the_pages_have_runnable_examples():
    pages = {where.split(":")[0] for where, _ in runnable_blocks()}
    assert {"docs/teachers.md", "docs/students.md"} <= pages
    assert sum(where.startswith("docs/teachers.md") for where, _ in runnable_blocks()) == 3


@pytest.mark.parametrize("where, code", runnable_blocks(), ids=[where for where, _ in runnable_blocks()])
def test_a_runnable_block_runs(where, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"
