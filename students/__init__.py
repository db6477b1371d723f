"""Vision-transformer students, each carrying a distillation token (see ``students.base``)."""
from students.registry import create_student, list_students, register_student
from students.base import DistilledStudent, StudentError, count_params, joint_logits

# Importing the model files registers their builders (an explicit list, no import-by-string).
from students import deit, vit, cait, cmt, dhvt  # noqa: F401,E402
from students.files import load_student, save_student  # noqa: E402

__all__ = [
    "create_student", "list_students", "register_student", "DistilledStudent", "StudentError", "count_params",
    "joint_logits", "load_student", "save_student",
]
