"""``distill export``: turn a trained student into a folder that timm or 🤗 transformers loads on its own.

Our export folder (``students/export.py``: ``model.safetensors`` + ``config.json``) needs this package
to load. :func:`export_student` converts it, with the same logits, into

* ``timm``: ``model.safetensors`` + ``config.json`` in timm's Hub layout, written by timm's own
  ``save_for_hf`` (what ``timm.models.push_to_hf_hub`` uploads, without its pickled copy); it loads
  with ``timm.create_model("local-dir:<folder>", pretrained=True)`` or :func:`load_timm_export`;
* ``hf``: ``model.safetensors`` + ``config.json`` + ``preprocessor_config.json`` in the on-disk
  format of transformers 4 and 5, for ``DeiTForImageClassificationWithTeacher``,
  ``DeiTForImageClassification`` or ``ViTForImageClassification``.

Which head the exported model outputs (``head``; default: the head the student predicts with,
``eval_head``: "joint", or "cls" for a student trained without a teacher):

* **joint** (DeiT): timm's ``deit_*_distilled_patch16_224`` and transformers'
  ``DeiTForImageClassificationWithTeacher`` both average the class and distillation heads at
  inference, exactly as our students do.
* **cls** (DeiT): the class token attends to the distillation token in every block, so dropping
  that token would change the logits; only its untrained head is dropped. timm: a
  ``deit_*_patch16_224`` with ``reg_tokens=1``, whose one "register" token sits right after the
  class token, in the sequence and in ``pos_embed``, exactly where the distillation token is, and
  whose head reads the class token alone. transformers: ``DeiTForImageClassification`` keeps the
  distillation token in its embeddings and classifies from the class token alone.
* **dist** (DeiT): self-attention has no mask and treats the tokens as a set, so swapping the two
  tokens (and their ``pos_embed`` rows) puts the distillation token first; the plain classifiers
  above then give the distillation head.
* **ViT** students have one token and one head: ``vit_*_patch16_224`` / ``ViTForImageClassification``.
* **CaiT** (timm only): each token attends to itself and the patches, never to the other token
  (``students/cait.py``), so one head is exactly timm's ``cait_*`` with that token as its class
  token; the joint head, an average over two tokens, has no timm counterpart.
* CMT and DHVT have no timm or transformers equivalent.

Before anything is moved into place the folder is loaded back with the target library (for
``hf`` only when transformers is installed) and its logits are compared with the student's.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from distill.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["export_student", "ExportError", "FORMATS", "HEADS", "MARKER"]

FORMATS = ("timm", "hf")
HEADS = ("joint", "cls", "dist")
#: Written into every export folder: what was exported from where. Its presence is what allows a
#: later export to replace the folder.
MARKER = "distill_export.json"
#: Tolerance of the load-back check, relative to the largest logit (at least 1). timm and
#: transformers gave logits within 1e-7 of ours in every test (0 for DeiT-S at 224 with logits
#: up to 22); a wrong mapping moves them by far more: transformers' default LayerNorm eps by
#: ~1e-4, a head or token mixed up by ~1e-1.
VERIFY_RTOL = 1e-5


class ExportError(ValueError):
    """A student, folder or option that cannot be exported; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------


def export_student(path: str | Path, format: str, out: str | Path | None = None, push_to_hub: str | None = None,
                   head: str | None = None, verify: bool = True) -> Path:
    """Convert the student in ``path`` (``runs/<name>`` or an export folder) to ``format`` ("timm"/"hf").

    Args:
        out: the folder to write; default ``<export folder>_<format>`` (``runs/<name>/export_timm``).
            An existing non-empty folder is replaced only if a previous export wrote it.
        push_to_hub: a Hub repo id (``user/name``); the folder is then uploaded with huggingface_hub.
        head: "joint", "cls" or "dist": the head the exported model outputs (module docstring);
            default: the one the student predicts with.
        verify: load the folder back with the target library and compare logits (skipped for
            ``hf`` when transformers is not installed).

    Returns the output folder. Nothing is written if any step fails.
    """
    import students  # here, not at import time: `students` imports `distill`

    if format == "onnx":  # a graph for runtimes rather than a library's folder: distill/onnx_export.py
        from distill.onnx_export import export_onnx
        return export_onnx(path, out=out, head=head, verify=verify, push_to_hub=push_to_hub)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use --format timm, --format hf or --format onnx")
    if head is not None and head not in HEADS:
        raise ExportError(f"unknown head {head!r}; use --head joint, --head cls or --head dist")
    export_dir = locate_export(path)
    info = read_export_config(export_dir)
    model = students.load_student(export_dir).eval()
    family = _family(model)
    if family not in ("deit", "vit", "cait"):
        raise _unsupported(family, info["student"]["name"])
    # A ViT has one token and one head: every head is the class head.
    head = "cls" if family == "vit" else (head or model.eval_head)
    # `distill train` records the eval transform; a student saved by hand may not (DataConfig defaults).
    info = {"img_size": model.patch_embed.img_size[0], "transform": "deit", "crop_pct": 0.875,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **info}
    out = resolve_out(export_dir, format, out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = _write_timm if format == "timm" else _write_hf
        with torch.no_grad():
            meta = writer(model, info, head, tmp)
            meta["checked_max_abs_diff"] = _verify(format, model, head, tmp, meta) if verify else None
        meta.update(format=format, head=head, source=str(export_dir.resolve()), student=info["student"]["name"])
        (tmp / "README.md").write_text(_model_card(meta, info, repo=push_to_hub, folder=out))
        meta["files"] = sorted(p.name for p in tmp.iterdir()) + [MARKER]
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():  # resolve_out made sure a previous export wrote it
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub:
        upload(out, push_to_hub, commit_message=f"Add {meta['student']} ({meta['target']}) exported by deit-distill")
    return out


# --------------------------------------------------------------------------------------------------
# Input and output folders
# --------------------------------------------------------------------------------------------------


def locate_export(path: str | Path) -> Path:
    """The export folder of a run folder (``<run>/export``), or ``path`` itself if it is one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass runs/<name> or runs/<name>/export")
    if (path / "export" / "config.json").is_file():
        return path / "export"
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"run {path} has not finished (no export/ yet); finish it with "
                                "`distill train <recipe> --resume`, then export it")
    if (path / "teacher.json").is_file():
        raise ExportError(f"{path} is a fine-tuned teacher, not a student; pass the student's run folder runs/<name>")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a run folder nor an exported student (no config.json); "
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


# --------------------------------------------------------------------------------------------------
# Which student, which head
# --------------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    from students.cait import CaiT
    from students.deit import VisionTransformerDistilled

    if isinstance(model, VisionTransformerDistilled):
        return "deit" if model.has_dist_token else "vit"
    if isinstance(model, CaiT):
        return "cait"
    return type(model).__name__


def head_logits(model: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """The logits of ``head`` ("joint", "cls" or "dist"), the output an export must reproduce."""
    cls_logits, dist_logits = model.forward_heads(x)
    return {"cls": cls_logits, "dist": dist_logits, "joint": (cls_logits + dist_logits) / 2}[head]


def _unsupported(family: str, name: str) -> ExportError:
    if family == "cait":
        return ExportError(f"student {name!r} (CaiT) has no transformers equivalent; use --format timm")
    return ExportError(f"student {name!r} ({family}) has no timm or transformers equivalent, so it cannot be "
                       "exported; use its export folder as it is (students.load_student, `distill eval`)")


class _Weights:
    """The student's state dict; every tensor must be taken or dropped by name, so a converter
    that forgets one (a new parameter in a student) fails loudly instead of exporting without it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def drop(self, *keys: str) -> None:
        self.used.update(k for k in keys if k in self.state)

    def check_all_used(self) -> None:
        left = sorted(set(self.state) - self.used)
        if left:
            raise RuntimeError(f"the export does not know where to put {left[:5]}; the student has tensors this "
                               "converter was not written for")


def _first_token_order(w: _Weights, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first token, second token, pos_embed) of a DeiT, with the two tokens swapped for the dist head."""
    cls_token, dist_token, pos_embed = w("cls_token"), w("dist_token"), w("pos_embed")
    if head != "dist":
        return cls_token, dist_token, pos_embed
    pos_embed = pos_embed.clone()
    pos_embed[:, [0, 1]] = pos_embed[:, [1, 0]]
    return dist_token, cls_token, pos_embed


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


def _timm_size(name: str, default: str = "base") -> str:
    part = name.split("_")[1] if "_" in name else ""
    return part if part in ("tiny", "small", "base") else default


def _img_size(model: nn.Module) -> int | list[int]:
    h, w = model.patch_embed.img_size
    return h if h == w else [h, w]


def _vit_args(model: nn.Module) -> dict[str, Any]:
    block = model.blocks[0]
    return dict(
        img_size=_img_size(model), patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels, embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, num_classes=model.num_classes,
    )


def _timm_plan(model: nn.Module, name: str, family: str, head: str) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(timm architecture, its model args, the state dict it loads strictly)."""
    import timm

    w = _Weights(model.state_dict())
    if family == "vit":
        state = {k: w(k) for k in w.state}
        arch, args = f"vit_{_timm_size(name)}_patch16_224", _vit_args(model)
    elif family == "deit" and head == "joint":
        state = {k: w(k) for k in w.state}
        arch, args = f"deit_{_timm_size(name)}_distilled_patch16_224", _vit_args(model)
    elif family == "deit":
        first, second, pos_embed = _first_token_order(w, head)
        src = "head_dist" if head == "dist" else "head"
        state = {k: w(k) for k in w.state if not k.startswith(("head.", "head_dist.")) and k not in ("cls_token", "dist_token", "pos_embed")}
        state.update({"cls_token": first, "reg_token": second, "pos_embed": pos_embed,
                      "head.weight": w(f"{src}.weight"), "head.bias": w(f"{src}.bias")})
        w.drop("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
        arch, args = f"deit_{_timm_size(name)}_patch16_224", {**_vit_args(model), "reg_tokens": 1}
    elif family == "cait":
        if head == "joint":
            raise ExportError(f"student {name!r} (CaiT) predicts with the average of two tokens' heads, which timm's CaiT "
                              "(one class token) cannot express; export one head with --head cls or --head dist")
        token, src = ("dist_token", "head_dist") if head == "dist" else ("cls_token", "head")
        state = {k: w(k) for k in w.state if not k.startswith(("head.", "head_dist.")) and k not in ("cls_token", "dist_token")}
        state.update({"cls_token": w(token), "head.weight": w(f"{src}.weight"), "head.bias": w(f"{src}.bias")})
        w.drop("cls_token", "dist_token", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
        arch = f"{name}_224" if timm.is_model(f"{name}_224") else "cait_xxs24_224"
        block, ca = model.blocks[0], model.blocks_token_only
        args = dict(
            img_size=_img_size(model), patch_size=model.patch_embed.patch_size[0],
            in_chans=model.patch_embed.proj.in_channels, embed_dim=model.embed_dim, depth=len(model.blocks),
            num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None, depth_token_only=len(ca),
            mlp_ratio_token_only=ca[0].mlp.fc1.out_features / model.embed_dim if len(ca) else 4.0,
            num_classes=model.num_classes,
        )
    else:
        raise _unsupported(family, name)
    w.check_all_used()
    return arch, args, state


def timm_data_config(info: dict[str, Any]) -> dict[str, Any]:
    """Our eval transform in timm's terms (``timm.data.create_transform`` rebuilds it exactly).

    ``deit``: resize the short side to ``floor(img_size / crop_pct)``, bicubic, center-crop, which is
    timm's "center" crop mode. ``small``: resize to ``img_size`` x ``img_size`` (a no-op for images
    already that size), which is timm's "squash" mode at crop_pct 1.0.
    """
    style, crop_pct = info["transform"], info["crop_pct"]
    return dict(
        input_size=(3, info["img_size"], info["img_size"]), interpolation="bicubic",
        crop_pct=crop_pct if style == "deit" else 1.0, crop_mode="center" if style == "deit" else "squash",
        mean=tuple(info["mean"]), std=tuple(info["std"]),
    )


def _write_timm(model: nn.Module, info: dict[str, Any], head: str, folder: Path) -> dict[str, Any]:
    import timm
    from timm.models._hub import save_for_hf  # not re-exported by timm.models before 1.0.2x

    name = info["student"]["name"]
    arch, args, state = _timm_plan(model, name, _family(model), head)
    target = timm.create_model(arch, **args)
    target.load_state_dict(state, strict=True)
    # Keep only what describes these weights (no tag, license or paper of the ImageNet checkpoint
    # the architecture name would carry over) plus our eval transform. Set on the model rather than
    # passed as save_for_hf(data_config=...), which timm < 1.0.2x does not take.
    keep = ("architecture", "fixed_input_size", "num_classes", "pool_size", "first_conv", "classifier")
    target.pretrained_cfg = {**{k: v for k, v in target.pretrained_cfg.items() if k in keep}, **timm_data_config(info)}
    model_config = {"label_names": list(info["class_names"])} if info.get("class_names") else {}
    save_for_hf(target, str(folder), model_config=model_config, model_args=args, safe_serialization=True)
    saved = json.loads((folder / "config.json").read_text())
    return {"target": f"timm {arch}", "architecture": arch, "model_args": saved.get("model_args", args)}


# --------------------------------------------------------------------------------------------------
# 🤗 transformers
# --------------------------------------------------------------------------------------------------


def _hf_encoder(w: _Weights, prefix: str, depth: int, dim: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """timm blocks -> HF ViT/DeiT layers: 16 tensors per block (12 without qkv bias), ``qkv`` split in three."""
    out = {}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        # timm's fused qkv projection stacks the query, key and value rows in this order.
        for part, t in zip(("query", "key", "value"), w(b + "attn.qkv.weight").split(dim)):
            out[f"{h}attention.attention.{part}.weight"] = t
        if qkv_bias:
            for part, t in zip(("query", "key", "value"), w(b + "attn.qkv.bias").split(dim)):
                out[f"{h}attention.attention.{part}.bias"] = t
        for ours, theirs in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            out[f"{h}{theirs}.weight"] = w(f"{b}{ours}.weight")
            out[f"{h}{theirs}.bias"] = w(f"{b}{ours}.bias")
    return out


def hf_image_processor_config(info: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``preprocessor_config.json`` that reproduces our eval transform (PIL backend; see NOTES).

    ``deit``: the short side to ``floor(img_size / crop_pct)`` (bicubic), then a center crop.
    ``DeiTImageProcessor``/``ViTImageProcessor`` only take a ``shortest_edge`` size from
    transformers 5 on, so this is written as ``BitImageProcessor``, which does exactly that in 4.x
    and 5.x. ``small``: resize to ``img_size`` x ``img_size`` (no-op for images already that size)
    with the model's own processor.
    """
    size = info["img_size"]
    common = dict(
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(info["mean"]), image_std=list(info["std"]),
        resample=3,  # PIL.Image.BICUBIC, the interpolation of build_transform
    )
    if info["transform"] == "deit":
        short = math.floor(size / info["crop_pct"])  # what timm's eval transform computes
        return dict(image_processor_type="BitImageProcessor", do_resize=True, size={"shortest_edge": short},
                    do_center_crop=True, crop_size={"height": size, "width": size}, do_convert_rgb=True, **common)
    cls = "DeiTImageProcessor" if model_type == "deit" else "ViTImageProcessor"
    return dict(image_processor_type=cls, do_resize=True, size={"height": size, "width": size},
                do_center_crop=False, crop_size={"height": size, "width": size}, **common)


def _hf_plan(model: nn.Module, name: str, family: str, head: str) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(model_type, architecture class, the state dict in transformers' on-disk names)."""
    w = _Weights(model.state_dict())
    dim, depth = model.embed_dim, len(model.blocks)
    qkv_bias = model.blocks[0].attn.qkv.bias is not None
    if family == "vit":
        model_type, arch, p = "vit", "ViTForImageClassification", "vit."
        state = {f"{p}embeddings.cls_token": w("cls_token"), f"{p}embeddings.position_embeddings": w("pos_embed")}
    elif family == "deit":
        model_type, p = "deit", "deit."
        first, second, pos_embed = _first_token_order(w, head)
        state = {f"{p}embeddings.cls_token": first, f"{p}embeddings.distillation_token": second,
                 f"{p}embeddings.position_embeddings": pos_embed}
    else:
        raise _unsupported(family, name)
    state[f"{p}embeddings.patch_embeddings.projection.weight"] = w("patch_embed.proj.weight")
    state[f"{p}embeddings.patch_embeddings.projection.bias"] = w("patch_embed.proj.bias")
    state.update(_hf_encoder(w, p, depth, dim, qkv_bias))
    state[f"{p}layernorm.weight"], state[f"{p}layernorm.bias"] = w("norm.weight"), w("norm.bias")
    if family == "deit" and head == "joint":
        arch = "DeiTForImageClassificationWithTeacher"
        for ours, theirs in (("head", "cls_classifier"), ("head_dist", "distillation_classifier")):
            state[f"{theirs}.weight"], state[f"{theirs}.bias"] = w(f"{ours}.weight"), w(f"{ours}.bias")
    else:
        arch = arch if family == "vit" else "DeiTForImageClassification"
        src = "head_dist" if head == "dist" and family == "deit" else "head"
        state["classifier.weight"], state["classifier.bias"] = w(f"{src}.weight"), w(f"{src}.bias")
        w.drop("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
    w.check_all_used()
    return model_type, arch, state


def _write_hf(model: nn.Module, info: dict[str, Any], head: str, folder: Path) -> dict[str, Any]:
    name = info["student"]["name"]
    model_type, arch, state = _hf_plan(model, name, _family(model), head)
    names = list(info.get("class_names") or [f"LABEL_{i}" for i in range(model.num_classes)])
    block = model.blocks[0]
    config = {
        "architectures": [arch], "model_type": model_type,
        "hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
        "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",  # the exact (erf) GELU of timm's Mlp
        # transformers' default is 1e-12; DeiT/timm use 1e-6, and the logits move by ~1e-3 otherwise.
        "layer_norm_eps": model.norm.eps,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "image_size": model.patch_embed.img_size[0], "patch_size": model.patch_embed.patch_size[0],
        "num_channels": model.patch_embed.proj.in_channels, "qkv_bias": block.attn.qkv.bias is not None,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # transformers refuses safetensors files without this metadata
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = hf_image_processor_config(info, model_type)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return {"target": f"transformers {arch}", "architecture": arch, "image_processor": processor["image_processor_type"]}


# --------------------------------------------------------------------------------------------------
# Load back and compare
# --------------------------------------------------------------------------------------------------


def load_timm_export(folder: str | Path) -> nn.Module:
    """The exported timm model, loaded by timm alone (strictly) and in eval mode.

    Same as ``timm.create_model("local-dir:<folder>", pretrained=True)``, spelled so that timm
    releases without the ``local-dir:`` source (1.0.9) load it too. ``pretrained_cfg`` must come
    along: without its ``num_classes`` timm treats the head as another class count's, drops it
    and loads the rest non-strictly.
    """
    import timm

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    overlay = dict(cfg["pretrained_cfg"], file=str(folder / "model.safetensors"))
    return timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                             **cfg.get("model_args", {})).eval()


def load_hf_export(folder: str | Path) -> nn.Module:
    """The exported transformers model, loaded by transformers alone, with no missing or unexpected tensor."""
    import transformers
    from transformers.utils import logging as hf_logging

    arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per call is noise here
    try:
        model, report = getattr(transformers, arch).from_pretrained(str(folder), output_loading_info=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(v) for k, v in report.items() if k != "error_msgs" and v}
    if bad or report.get("error_msgs"):
        raise RuntimeError(f"transformers did not load {folder} cleanly: {bad or report['error_msgs']}")
    return model.eval()


def _verify(format: str, model: nn.Module, head: str, folder: Path, meta: dict) -> float | None:
    if format == "timm":
        target = load_timm_export(folder)
        run: Callable[[torch.Tensor], torch.Tensor] = target
    else:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return None  # nothing to check against; the tests check this path where transformers is installed
        target = load_hf_export(folder)
        run = lambda x: target(pixel_values=x).logits  # noqa: E731
    size = model.patch_embed.img_size
    x = torch.randn(2, model.patch_embed.proj.in_channels, *size, generator=torch.Generator().manual_seed(0))
    expected, got = head_logits(model, head, x), run(x)
    diff, tol = (expected - got).abs().max().item(), VERIFY_RTOL * max(1.0, expected.abs().max().item())
    if not diff <= tol:
        raise ExportError(f"the exported {meta['target']} gives logits {diff:.1e} away from the student's "
                          f"(> {tol:.0e}); nothing was written. Please report this with your timm/transformers "
                          "versions, or pass --no-verify to write the folder anyway")
    return diff


# --------------------------------------------------------------------------------------------------
# Model card and upload
# --------------------------------------------------------------------------------------------------

_HEAD_TEXT = {
    "joint": "the average of the class and distillation heads (DeiT's joint classifier)",
    "cls": "the class head",
    "dist": "the distillation head",
}


def _model_card(meta: dict, info: dict, repo: str | None, folder: Path) -> str:
    names = info.get("class_names") or []
    where = f"hf-hub:{repo}" if repo else f"local-dir:{folder}"
    if meta["format"] == "timm":
        library = "timm"
        usage = (f"import timm\nmodel = timm.create_model(\"{where}\", pretrained=True).eval()\n"
                 "cfg = timm.data.resolve_data_config({}, model=model)\n"
                 "transform = timm.data.create_transform(**cfg)  # the student's eval transform")
    else:
        library = "transformers"
        source = repo or str(folder)
        usage = (f"from transformers import AutoImageProcessor, {meta['architecture']}\n"
                 f"processor = AutoImageProcessor.from_pretrained(\"{source}\", backend=\"pil\")  # PIL resizing, as in training\n"
                 f"model = {meta['architecture']}.from_pretrained(\"{source}\").eval()")
    shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
    return (
        f"---\nlibrary_name: {library}\npipeline_tag: image-classification\ntags:\n- image-classification\n"
        f"- {library}\n- deit-distill\n---\n"
        f"# {repo.split('/')[-1] if repo else meta['student']}\n\n"
        f"A `{meta['student']}` student trained with deit-distill "
        f"(distillation: {info.get('distill', 'unknown')}), exported as {meta['target']}. "
        f"It outputs {_HEAD_TEXT[meta['head']]}.\n\n"
        f"- classes ({len(names)}): {shown or 'unnamed'}\n"
        f"- input: {info['img_size']}x{info['img_size']} RGB, eval transform `{info['transform']}`, "
        f"mean {list(info['mean'])}, std {list(info['std'])}\n\n"
        f"```python\n{usage}\n```\n"
    )


def upload(folder: Path, repo: str, commit_message: str) -> str:
    """Create ``repo`` on the Hub if needed and upload ``folder``; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except Exception as e:  # network, login, permissions: the folder is written either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"could not upload {folder} to {repo} ({type(e).__name__}: {first}); the folder is written: "
                          "log in with `hf auth login` (or set HF_TOKEN) and run the same command again") from None
    return repo_id
