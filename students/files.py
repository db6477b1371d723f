"""A student's own files: ``model.safetensors`` + ``config.json``, written and loaded back in one call.

    model = students.load_student("runs/cifar10_deit_tiny/export")
    model.eval(); joint_logits = model(images)

``config.json`` holds the builder arguments (``name``, ``num_classes``, ``img_size``, ...) that
``create_student`` recorded, how eval mode predicts (``eval_head``, ``joint``), plus anything the
caller adds (class names, mean/std).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from distill import weights
from distill.errors import NotFoundError, message_line
from students.registry import StudentError, create_student

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_student(model: nn.Module, directory: str | Path, **extra) -> Path:
    """Write ``model`` (built by ``create_student``) to ``directory``; ``extra`` goes into the JSON."""
    args = getattr(model, "student_args", None)
    if args is None:
        raise ValueError("save_student needs a model built by students.create_student (it has no student_args)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"student": args, "eval_head": getattr(model, "eval_head", "joint"),
              "joint": getattr(model, "joint", "logits"), **extra}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=list) + "\n")
    return directory


# What `distill train` writes into config.json besides the builder's arguments, and what reads it
# back (evaluation's transform, the eval-mode head): a field of another type would fail far from here.
_FIELDS = {
    "img_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "crop_pct": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
    "transform": lambda v: v in ("deit", "small"),
    "mean": lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v),
    "std": lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and x > 0 for x in v),
    "class_names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "eval_head": lambda v: v in ("joint", "cls", "dist"),
    "joint": lambda v: v in ("logits", "softmax"),
}


def _check_fields(config: dict, args: dict, name: str, damaged: str, rewrite: str) -> None:
    """One line naming the first field of ``config.json`` whose value has the wrong type."""
    for key, ok in _FIELDS.items():
        if key in config and not ok(config[key]):
            raise StudentError(f"{damaged}: field {key!r} is {config[key]!r}; {rewrite}")
    for key, value in args.items():  # the builder's arguments, against its class's typed signature
        expected = _argument_types(name).get(key)
        if expected is not None and value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            what = "an integer" if expected is int else "a number"
            raise StudentError(f"{damaged}: field 'student.{key}' is {value!r}, not {what}; {rewrite}")


def _argument_types(name: str) -> dict[str, type]:
    """``{argument: int | float}`` of a registered student's class, from its signature's defaults."""
    from students.registry import student_class

    params = inspect.signature(student_class(name).__init__).parameters.values()
    types: dict = {p.name: type(p.default) for p in params if type(p.default) in (int, float)}
    types.update({k: (int, float) for k, t in types.items() if t is float})  # 4 is a fine float
    return {"num_classes": int, **types}


def load_student(directory: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild an exported student and load its weights (strict: every tensor must match)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise NotFoundError(
            f"{directory} is not an exported student: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by `distill train` into <run>/export)"
        )
    rewrite = f"delete {directory} and run `distill train <recipe> --resume` to write it again from the last checkpoint"
    try:
        config = json.loads(cfg_path.read_text())
        args = dict(config["student"])
        name = args.pop("name")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StudentError(f"{cfg_path} is damaged ({type(e).__name__}: {message_line(e)}); {rewrite}") from None
    _check_fields(config, args, name, f"{cfg_path} is damaged", rewrite)
    model = create_student(name, **args)
    try:
        state = load_file(str(w_path), device=map_location)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise StudentError(f"{w_path} is damaged or truncated ({message_line(e)}); {rewrite}") from None
    weights.load_strict(model, state, lambda problem: ValueError(
        f"{w_path} does not match the student in {cfg_path} ({problem}); re-export it with the same distill version"))
    model.eval_head = config.get("eval_head", "joint")
    # Exports written before `student.joint` existed fused logits, the official DeiT rule.
    model.joint = config.get("joint", "logits")
    model.export_config = config
    return model
