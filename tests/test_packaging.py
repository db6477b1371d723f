"""The package as a user gets it: `distill --version` from one place, and (slow) the wheel installed
non-editable into a fresh virtual environment, run from a folder outside the checkout."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import distill
from distill.cli import main as cli

from conftest import REPO, read_metrics

# What the wheel is built from (pyproject.toml's packages, data-files, readme and license-files).
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "distill", "teachers", "students", "recipes"]


def test_version_comes_from_one_place(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"distill {distill.__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "distill.__version__" }' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.MULTILINE)  # no second copy of the number


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path, tiny_dataset):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    # Build from a copy of the sources: the build writes build/ and *.egg-info next to pyproject.toml,
    # and the checkout stays as it is. No network: this environment's setuptools builds it.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp_path / "dist"), str(src)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("deit_distill-*.whl"))
    assert wheel.name.startswith(f"deit_distill-{distill.__version__}-")

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "share/deit-distill/recipes/quickstart.yaml" in "\n".join(names)
    for line in ("License-Expression: Apache-2.0", "Classifier: Intended Audience :: Science/Research",
                 "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence", "Keywords: ",
                 "Project-URL: Documentation, ", "Project-URL: Source, ", "Project-URL: Issues, "):
        assert line in metadata, line

    # A fresh environment that sees this one's packages (torch, timm, ...) through a .pth file of plain
    # paths: Python runs the .pth files of its own site folders only, so an editable install of this
    # checkout here (its __editable__ .pth finder) stays out, and the wheel's distill is the one imported.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    here = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "outer_packages.pth").write_text("\n".join(here) + "\n")
    # --ignore-installed: pip installs into the new environment and never touches this one's deit-distill.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-warn-script-location",
          str(wheel)], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    exe = str(venv / "bin" / "distill")
    where = _run([str(python), "-c", "import distill, teachers, students; "
                  "print(distill.__file__); print(teachers.__file__); print(students.__file__)"], outside, env)
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout
    assert _run([exe, "--version"], outside, env).stdout.strip() == f"distill {distill.__version__}"

    listed = dict(line.split(None, 1) for line in _run([exe, "recipes"], outside, env).stdout.splitlines())
    assert set(listed) == {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert all(Path(p.strip()).parent == venv / "share" / "deit-distill" / "recipes" for p in listed.values())

    # A tiny run from a built-in recipe (its base), in this folder, with the tiny dataset.
    (outside / "tiny.yaml").write_text(
        f"base: quickstart\ndata: {{source: {tiny_dataset}, train_per_class: null}}\n"
        "student: {kwargs: {embed_dim: 32, depth: 1, num_heads: 2}}\nteacher_train: {epochs: 1, batch_size: 16}\n"
        "train: {epochs: 1, batch_size: 16}\n")
    _run([exe, "train", "tiny.yaml"], outside, env)
    assert len(read_metrics(outside / "runs" / "tiny")) == 1
    assert (outside / "runs" / "tiny" / "export" / "model.safetensors").is_file()
