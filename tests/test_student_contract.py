"""The student contract (tests/student_contract.py), the family hooks included, over every registered
student: a new family is checked by registering it.

Each student is built small (``SMALL`` by family: one block, a narrow width, 32x32 inputs) so that
all of them run in seconds; a family without an entry is built at its registered size.
"""
from __future__ import annotations

import pytest
import torch

from student_contract import (check_backward, check_exports, check_hard_distillation_steps, check_interface,
                              check_load_pretrained, check_token_probes)
from students import create_student, list_students
from students.registry import student_class

NUM_CLASSES = 5
SMALL = {
    "VisionTransformerDistilled": dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "CaiT": dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "DHVT": dict(img_size=32, embed_dim=32, depth=1, num_heads=2),
    "CMT": dict(img_size=32, stem_chans=8, dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_student(name, num_classes=NUM_CLASSES, **SMALL.get(student_class(name).__name__, {}))


def image_size(model) -> int:
    size = model.student_args.get("img_size") or getattr(model, "img_size", 224)
    return size if isinstance(size, int) else size[0]


@pytest.mark.parametrize("name", list_students())
def test_every_registered_student_keeps_the_contract(name, tmp_path):
    model = build(name)
    size = image_size(model)
    check_interface(model, img_size=size, num_classes=NUM_CLASSES)
    check_backward(model, img_size=size)
    check_token_probes(model, img_size=size)
    check_load_pretrained(build(name, seed=1), source=build(name, seed=2))
    check_exports(build(name), tmp_path)
    check_hard_distillation_steps(model, img_size=size, num_classes=NUM_CLASSES)
