"""benchmarks/results and docs/ are committed: no file there names a folder of the machine that wrote it
(a teacher checkpoint, a data folder, an --out under /tmp), and every benchmark has its own folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import REPO

# An absolute POSIX path of two or more components (/work/main, /tmp/tc/x.json) or a Windows drive
# path, not preceded by a character that makes it part of a relative path, a placeholder or a URL
# (../runs, <run>/analysis/x.json, {out}/a/b, https://).
ABSOLUTE = re.compile(r"(?<![\w.~/:\\>}\]*-])/[\w.+-]+/[\w.+-]|\b[A-Za-z]:\\")
TEXT = {".json", ".md", ".txt", ".yaml", ".yml", ".csv"}


def _strings(value):
    """Every string of a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def machine_paths(root: Path) -> list[str]:
    """``file: text`` for every JSON string value or line of text under ``root`` that names an absolute path."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT):
        text = path.read_text(errors="replace")
        pieces = _strings(json.loads(text)) if path.suffix == ".json" else text.splitlines()
        found += [f"{path.relative_to(root)}: {piece.strip()[:120]}" for piece in pieces if ABSOLUTE.search(piece)]
    return found


def test_the_checker_finds_a_machine_path_and_passes_relative_ones(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "ok.json").write_text(json.dumps(
        {"teacher_checkpoint": "../../../runs/bench/teacher/export/model.safetensors", "data": "uoft-cs/cifar10",
         "unit": "img/s", "link": "https://github.com/facebookresearch/deit", "command": "python x.py --out results/a.json"}))
    (tmp_path / "ok.md").write_text("Runs on ../../shared/data: loop/step 0.9, 1/2 of the cores, `<run>/analysis/a.json`, (docs/x.png).\n")
    assert machine_paths(tmp_path) == []

    (tmp_path / "bench" / "bad.json").write_text(json.dumps(
        {"rows": [{"checkpoint": "/work/main/runs/t/export/model.safetensors"}], "command": "x --out /tmp/tc/p.json"}))
    (tmp_path / "bad.md").write_text("Runs on /home/me/data/cifar10.\nfine line\nmade in C:\\Users\\me\\runs\n")
    assert machine_paths(tmp_path) == [
        "bad.md: Runs on /home/me/data/cifar10.", "bad.md: made in C:\\Users\\me\\runs",
        "bench/bad.json: /work/main/runs/t/export/model.safetensors", "bench/bad.json: x --out /tmp/tc/p.json"]


def test_results_and_docs_name_no_folder_of_any_machine():
    for root in (REPO / "benchmarks" / "results", REPO / "docs"):
        if root.is_dir():
            assert machine_paths(root) == [], f"absolute paths in {root.relative_to(REPO)}; record them relative"


def test_every_result_sits_in_the_folder_of_its_benchmark():
    results = REPO / "benchmarks" / "results"
    assert [p.name for p in results.iterdir() if p.is_file()] == []
    index = (REPO / "benchmarks" / "README.md").read_text()
    for folder in results.iterdir():
        assert f"results/{folder.name}/" in index, f"benchmarks/README.md does not list results/{folder.name}/"
