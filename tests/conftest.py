"""Shared fixtures: offline Hugging Face settings, a tiny image-folder dataset and a tiny recipe."""
from __future__ import annotations

import os
from pathlib import Path

# No test may reach the Hub: the machines that run them have no network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(os.environ.get("DISTILL_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


def _write_image_folder(root: Path, per_class: dict[str, int], size: int = 16, seed: int = 0) -> None:
    """Four classes a small model can tell apart: a bright quadrant at a class-specific place, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in range(4):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                img[r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] += 150
                Image.fromarray(img).save(d / f"{i}.png")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """An image folder with train/ (4 x 12 images) and val/ (4 x 4 images) of 16x16 PNGs."""
    root = tmp_path_factory.mktemp("tiny_images")
    _write_image_folder(root, {"train": 12, "val": 4})
    return root


# Tiny image datasets of the data tests (test_sources, test_splits, test_images); helpers in tiny_images.py.


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """<root>/<class>/<i>.png: 3 classes x 10 images (30), no split subfolders."""
    from tiny_images import CLASSES, class_image

    root = tmp_path_factory.mktemp("imagefolder")
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in range(10):
            class_image(cls, i).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def split_image_folder(tmp_path_factory) -> Path:
    """<root>/train|val/<class>/<i>.png: 4 train and 2 val images per class."""
    from PIL import Image

    from tiny_images import CLASSES, COLORS

    root = tmp_path_factory.mktemp("splitfolder")
    for split, n in (("train", 4), ("val", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), COLORS[cls]).save(root / split / cls / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    import pyarrow.parquet as pq

    from tiny_images import struct_table

    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    pq.write_table(struct_table(20), path)
    return path


def tiny_config(dataset: Path, output_dir: Path) -> dict:
    """A recipe small enough to train in seconds that still exercises every moving part
    (RandAugment, erasing, mixup/cutmix, drop path, a teacher, hard distillation)."""
    return {
        "data": {"source": str(dataset), "img_size": 16, "transform": "small", "crop_padding": 2,
                 "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                 "num_workers": 0},
        "student": {"name": "deit_tiny", "patch_size": 4, "drop_path": 0.1,
                    "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        "teacher": {"name": "resnet20_cifar"},
        "teacher_train": {"epochs": 1, "batch_size": 16, "opt": "sgd", "lr": 0.05},
        "distill": {"kind": "hard", "alpha": 0.5},
        "optim": {"lr": 1.0e-3, "warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": 8, "progress": False, "output_dir": str(output_dir)},
    }


def make_config(dataset: Path, out: Path, **sections):
    """``tiny_config`` as a validated ``distill.config.Config``, with sections updated by ``sections``."""
    from distill.config import Config
    from distill.recipes import update, validate

    raw = tiny_config(dataset, out)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    cfg = Config(name="tiny")
    update(cfg, raw)
    return validate(cfg)


def read_metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained_teacher(tiny_dataset, tmp_path_factory) -> Path:
    """A resnet20_cifar teacher fine-tuned on the tiny dataset for one epoch (its export's weights file)."""
    from distill.loop import train_teacher

    out = tmp_path_factory.mktemp("teacher_runs")
    train_teacher(make_config(tiny_dataset, out))
    return out / "tiny-teacher" / "export" / "model.safetensors"


@pytest.fixture
def tiny_recipe(tiny_dataset, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path / "runs")))
    return path


# A plugin package as a user would install it: a module registering a small CNN teacher, a function
# registering a small DeiT student, and the dist-info `pip install` writes (METADATA, entry_points.txt),
# so importlib.metadata finds its entry points on sys.path.
PLUGIN_TEACHERS = '''
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from teachers import register_teacher

LOADS = []  # one entry per import, for the tests
LOADS.append(1)


@register_teacher("tiny_cnn", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 16, 16))
def tiny_cnn(num_classes: int, pretrained: bool = False, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''

PLUGIN_STUDENTS = '''
from students import register_student
from students.deit import VisionTransformerDistilled

CALLS = []  # one entry per call of register(), for the tests


def register():
    CALLS.append(1)

    @register_student
    def tiny_deit(num_classes: int = 1000, img_size: int = 16, **kwargs) -> VisionTransformerDistilled:
        args = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
        return VisionTransformerDistilled(num_classes=num_classes, img_size=img_size, **{**args, **kwargs})
'''


def write_plugin(root: Path, package: str = "tiny_zoo", dist: str = "tiny-zoo", broken: bool = False) -> Path:
    """``package`` (teacher ``tiny_cnn``, student ``tiny_deit``) and its ``<dist>.dist-info`` under ``root``;
    ``broken``: its teachers module fails to import. Put ``root`` on sys.path (PYTHONPATH) to install it."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    teachers_source = "import no_such_module_anywhere\n" if broken else PLUGIN_TEACHERS
    (root / package / "teachers.py").write_text(teachers_source)
    (root / package / "students.py").write_text(PLUGIN_STUDENTS)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[deit_distill.teachers]\ntiny_cnn = {package}.teachers\n\n"
                                           f"[deit_distill.students]\ntiny_deit = {package}.students:register\n")
    return root


def launch_two_processes(args: list[str], logs: Path, hold: tuple[int, int, int, Path] | None = None):
    """``distill <args>`` in two processes on the CPU (gloo), as ``accelerate launch --multi_gpu`` starts
    them, each process's stderr also written to ``logs`` (``rank_stderr``). ``hold``: (rank, epoch,
    batch, marker) makes that process stop there and write its pid to the marker (tests/hold_rank.py)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    program = ["-m", "distill"] if hold is None else [str(REPO / "tests" / "hold_rank.py"), *map(str, hold)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--tee", "2",
           "--log_dir", str(logs), *program, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_stderr(logs: Path, rank: int) -> list[str]:
    """The lines one process wrote to stderr (torchrun's --tee copy), its launcher's report left out."""
    (file,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
    return file.read_text().strip().splitlines()


def wait_for_marker(marker: Path, proc, timeout: float = 300) -> int:
    """The pid the held process wrote to ``marker`` once it stopped (tests/hold_rank.py)."""
    import time

    deadline = time.time() + timeout
    while not (marker.is_file() and marker.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and marker.is_file(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no marker"
    return int(marker.read_text())
