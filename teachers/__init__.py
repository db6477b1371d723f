"""Frozen CNN teachers for DeiT distillation: a registry of timm networks plus custom builders."""
from teachers.registry import (
    TeacherMeta,
    build_teacher_network,
    create_teacher,
    list_teachers,
    load_teacher_checkpoint,
    register_teacher,
)
from teachers.teacher import Teacher, TeacherError, TeacherOptions
from teachers.files import TEACHER_CONFIG, TEACHER_WEIGHTS, read_teacher_meta, save_teacher
from teachers import whitened_vgg  # noqa: F401  (registers whitened_vgg_cifar)

__all__ = [
    "Teacher",
    "TeacherError",
    "TeacherOptions",
    "TeacherMeta",
    "build_teacher_network",
    "create_teacher",
    "list_teachers",
    "load_teacher_checkpoint",
    "register_teacher",
    "save_teacher",
    "read_teacher_meta",
    "TEACHER_WEIGHTS",
    "TEACHER_CONFIG",
]
