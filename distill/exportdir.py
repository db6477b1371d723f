"""Export folders: what `distill export`, `predict` and `report` read (``students/files.py`` writes them).

Finding a run's export folder (``locate_export``) and checking its ``config.json``; where a
conversion is written (``resolve_out``: it replaces only what an earlier `distill export` wrote,
as its ``MARKER`` file records); the eval transform an export records (``export_preprocessing``,
``eval_transform``); what an export must reproduce (``student_output``); the Hub upload.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import DataConfig
from distill.errors import DistillError, NotFoundError, message_line
from distill.transforms import build_transform
from students.base import DistilledStudent


#: The heads an export can output (every student has them; a ViT's three are its one head).
EXPORT_HEADS = ("joint", "cls", "dist")
#: Written into every folder `distill export` makes: what was exported from where. Its presence is
#: what allows a later export to replace the folder.
MARKER = "distill_export.json"
#: What to do when another `distill export` writes the same folder (it holds the folder's lock).
EXPORT_BUSY_FIX = "wait for it to finish, or pass another --out"


class ExportError(DistillError, ValueError):
    """A student, folder or option that cannot be exported; the message says what to do."""


def locate_export(path: str | Path) -> Path:
    """The export folder of a run folder (``<run>/export``), or ``path`` itself if it is one."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; pass runs/<name> or runs/<name>/export")
    if (path / "export" / "config.json").is_file():
        return path / "export"
    if (path / "teacher.json").is_file() or (path / "export" / "teacher.json").is_file():
        teacher = path if (path / "teacher.json").is_file() else path / "export"
        raise ExportError(f"{path} is a fine-tuned teacher, not a student ({teacher / 'teacher.json'}): export the "
                          "student's run folder runs/<name>; a student uses this teacher with "
                          f"teacher.checkpoint={teacher / 'model.safetensors'}")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise NotFoundError(f"run {path} has not finished (no export/ yet); finish it with "
                                "`distill train <recipe> --resume`, then export it")
    if not (path / "config.json").is_file():
        raise NotFoundError(f"{path} is neither a run folder nor an exported student (no config.json); "
                                "pass runs/<name> or runs/<name>/export")
    return path


def read_export_config(export_dir: Path) -> dict[str, Any]:
    """Our export's ``config.json``, checked enough for the conversion (one-line errors otherwise)."""
    cfg_path = export_dir / "config.json"
    try:
        info = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_path} is not valid JSON ({e}); it was damaged after `distill train` wrote it: "
                          "pass an intact export folder (runs/<name>/export)") from None
    if not isinstance(info, dict) or not isinstance(info.get("student"), dict) or "name" not in info["student"]:
        raise ExportError(f"{cfg_path} has no 'student' entry, so it was not written by `distill train` "
                          "(a timm/HF export cannot be exported again); pass runs/<name> or runs/<name>/export")
    return info


def resolve_out(export_dir: Path, format: str, out: str | Path | None) -> Path:
    """Where to write: ``out`` or ``<export folder>_<format>``; refuse to replace what we did not write."""
    out = Path(out) if out is not None else export_dir.with_name(f"{export_dir.name}_{format}")
    if out.is_file():
        raise ExportError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.is_file():
            raise ExportError(f"{out} exists, is not empty and was not written by `distill export`; "
                              "pass another --out or remove it")
        try:
            ours = set(json.loads(marker.read_text())["files"])
        except (ValueError, KeyError, TypeError):
            ours = set()
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise ExportError(f"{out} holds files a previous `distill export` did not write ({', '.join(foreign[:3])}); "
                              "pass another --out or move them away")
    return out



def student_output(model: DistilledStudent, head: str, x: torch.Tensor) -> torch.Tensor:
    """What an export of ``head`` must reproduce: the student's own eval-mode forward when ``head`` is
    the one it predicts with (``eval_head``, under its ``joint`` rule), else that head's logits."""
    return model(x) if head == model.eval_head else model.heads(x)[head]



def upload(folder: Path, repo: str, commit_message: str) -> str:
    """Create ``repo`` on the Hub if needed and upload ``folder``; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except Exception as e:  # network, login, permissions: the folder is written either way
        raise ExportError(f"could not upload {folder} to {repo} ({type(e).__name__}: {message_line(e)}); the folder is written: "
                          "log in with `hf auth login` (or set HF_TOKEN) and run the same command again") from None
    return repo_id


def with_default_preprocessing(info: dict, img_size: int) -> dict:
    """``info`` with the eval transform settings it lacks filled in: `distill train` records them
    (``img_size``, ``transform``, ``crop_pct``, ``mean``, ``std``), a student saved by hand may not,
    and then gets ``DataConfig``'s defaults at ``img_size``."""
    d = DataConfig()
    return {"img_size": img_size, "transform": d.transform, "crop_pct": d.crop_pct, "mean": d.mean, "std": d.std,
            **info}


def export_preprocessing(info: dict, model: nn.Module) -> dict:
    """The eval transform an export records (``img_size``, ``transform``, ``crop_pct``, ``mean``,
    ``std``; ``with_default_preprocessing``), at the model's input size where it records none."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    prep = with_default_preprocessing(info, size)
    return {"img_size": int(info.get("img_size") or size), "transform": prep["transform"],
            "crop_pct": prep["crop_pct"], "mean": list(prep["mean"]), "std": list(prep["std"])}


def eval_transform(prep: dict):
    """``distill eval``'s transform (``pipeline.image_dataset`` with train=False) from an export's
    recorded settings: PIL RGB image -> normalised float tensor."""
    return build_transform(prep["img_size"], False, style=prep["transform"], crop_pct=prep["crop_pct"],
                           mean=prep["mean"], std=prep["std"])
