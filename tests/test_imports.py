"""Each package imports on its own, in any order (distill imports teachers and students)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("order", [["teachers"], ["students", "teachers"], ["distill"]])
def test_import_order(order):
    code = "; ".join(f"import {m}" for m in order) + "; import distill; print(distill.train.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "train"


def test_models_do_not_depend_on_the_toolkit():
    """students/ and teachers/ import no `distill` module but the low-level distill.weights (lazily,
    since the `distill` package imports them): a family is usable without the training toolkit."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted([*(root / "students").glob("*.py"), *(root / "teachers").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if node.module == "distill" else node.module for a in node.names]
            else:
                continue
            for name in names:
                if name == "distill" or name.startswith("distill."):
                    assert name == "distill.weights", f"{path.name} imports {name}"
