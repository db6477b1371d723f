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
