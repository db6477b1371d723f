"""``distill export``: turn a trained student into a folder that timm or 🤗 transformers loads on its own.

Our export folder (``students/files.py``: ``model.safetensors`` + ``config.json``) needs this package
to load. :func:`export_student` converts it, with the same logits, into

* ``timm``: ``model.safetensors`` + ``config.json`` in timm's Hub layout, written by timm's own
  ``save_for_hf`` (what ``timm.models.push_to_hf_hub`` uploads, without its pickled copy); it loads
  with ``timm.create_model("local-dir:<folder>", pretrained=True)`` or :func:`load_timm_export`;
* ``hf``: ``model.safetensors`` + ``config.json`` + ``preprocessor_config.json`` in the on-disk
  format of transformers 4 and 5, for ``DeiTForImageClassificationWithTeacher``,
  ``DeiTForImageClassification`` or ``ViTForImageClassification``.

What the target is, and where each tensor goes, is the student family's knowledge: its
``to_timm(head, weights)`` / ``to_hf(head, weights)`` (``students/deit.py``, ``students/cait.py``;
other families have no equivalent and say so). This module does the rest: folders, the ledger that
makes a forgotten tensor fail, the writers, the load-back check, the model card and the upload.

Which head the exported model outputs (``head``; default: the head the student predicts with,
``eval_head``: "joint", or "cls" for a student trained without a teacher):

* **joint** (DeiT): timm's ``deit_*_distilled_patch16_224`` and transformers'
  ``DeiTForImageClassificationWithTeacher`` both average the class and distillation heads'
  *logits* at inference, the official DeiT rule (``student.joint=logits``). A student that
  predicts with the paper's softmax average (``student.joint=softmax``) would predict differently
  there, so its joint head is refused, with the hint to export one head instead.
* **cls** (DeiT): the class token attends to the distillation token in every block, so dropping
  that token would change the logits; only its untrained head is dropped.
* **dist** (DeiT): the two tokens swap places, so that classifiers reading the first token give
  the distillation head.
* **ViT** students have one token and one head: ``vit_*_patch16_224`` / ``ViTForImageClassification``.
* **CaiT** (timm only): one head is exactly timm's ``cait_*``; the joint head has no timm counterpart.
* CMT and DHVT have no timm or transformers equivalent.

Before anything is moved into place the folder is loaded back with the target library (for
``hf`` only when transformers is installed) and its logits are compared with what the student
itself gives: its eval-mode forward for the head it predicts with, else the chosen head.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

import students
from distill import atomic, lock, onnx_export
from distill.exportdir import (EXPORT_BUSY_FIX, EXPORT_HEADS, MARKER, ExportError, eval_transform, locate_export,
                               read_export_config, resolve_out, student_output, upload,
                               with_default_preprocessing)
from students.base import DistilledStudent, ExportWeights, StudentError

__all__ = ["export_student", "ExportError", "FORMATS", "EXPORT_HEADS", "HF_PROCESSORS", "MARKER"]

FORMATS = ("timm", "hf", "onnx")
#: The image processor a ``hf`` folder carries (``preprocessor_config.json``):
#: ``timm``: transformers' ``TimmWrapperImageProcessor`` running timm's eval transform, the very
#: tensors `distill eval` evaluates (needs timm beside transformers >= 4.48, and RGB images);
#: ``transformers``: the model's own processor (no timm; any image mode), whose center crop starts at
#: ``margin // 2`` where torchvision's starts at ``round(margin / 2)``: on images whose resized long side
#: leaves a margin of 4k + 3 pixels it sits one pixel off (logits then differ by ~1e-2).
HF_PROCESSORS = ("timm", "transformers")
#: Tolerance of the load-back check, relative to the largest logit (at least 1). timm and
#: transformers gave logits within 1e-7 of ours in every test (0 for DeiT-S at 224 with logits
#: up to 22); a wrong mapping moves them by far more: transformers' default LayerNorm eps by
#: ~1e-4, a head or token mixed up by ~1e-1.
VERIFY_RTOL = 1e-5


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------


def export_student(path: str | Path, format: str, out: str | Path | None = None, push_to_hub: str | None = None,
                   head: str | None = None, verify: bool = True, hf_processor: str = "timm") -> Path:
    """Convert the student in ``path`` (``runs/<name>`` or an export folder) to ``format`` ("timm"/"hf").

    Args:
        out: the folder to write; default ``<export folder>_<format>`` (``runs/<name>/export_timm``).
            An existing non-empty folder is replaced only if a previous export wrote it.
        push_to_hub: a Hub repo id (``user/name``); the folder is then uploaded with huggingface_hub.
        head: "joint", "cls" or "dist": the head the exported model outputs (module docstring);
            default: the one the student predicts with.
        verify: load the folder back with the target library and compare logits (skipped for
            ``hf`` when transformers is not installed); with ``hf_processor="timm"`` also the
            processor's tensors against `distill eval`'s.
        hf_processor: the image processor of a ``hf`` folder, "timm" or "transformers" (``HF_PROCESSORS``).

    Returns the output folder. Nothing is written if any step fails.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use --format timm, --format hf or --format onnx")
    if format == "onnx":  # a graph for runtimes rather than a library's folder: distill/onnx_export.py
        return onnx_export.export_onnx(path, out=out, head=head, verify=verify, push_to_hub=push_to_hub)
    if head is not None and head not in EXPORT_HEADS:
        raise ExportError(f"unknown head {head!r}; use --head joint, --head cls or --head dist")
    if hf_processor not in HF_PROCESSORS:
        raise ExportError(f"unknown image processor {hf_processor!r}; use --hf-processor timm or --hf-processor transformers")
    export_dir = locate_export(path)
    info, model, head, plan = _load(export_dir, format, head)
    out = resolve_out(export_dir, format, out)

    meta: dict[str, Any] = {}

    def fill(folder: Path) -> None:  # checked before it replaces `out` (resolve_out: a previous export's)
        with torch.no_grad():
            if format == "timm":
                meta.update(_write_timm(plan, model, info, folder))
            else:
                meta.update(_write_hf(plan, model, info, folder, hf_processor))
            meta["checked_max_abs_diff"] = _verify(format, model, head, folder, meta, plan, info) if verify else None
        meta.update(format=format, head=head, eval_head=model.eval_head, joint=model.joint,
                    has_dist_token=model.has_dist_token, source=str(export_dir.resolve()),
                    student=info["student"]["name"])
        (folder / "README.md").write_text(_model_card(meta, info, repo=push_to_hub, folder=out))
        meta["files"] = sorted(p.name for p in folder.iterdir()) + [MARKER]
        (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")

    with lock.hold(out, "export folder", EXPORT_BUSY_FIX):  # one writer
        atomic.write_dir(out, fill)
    if push_to_hub:
        upload(out, push_to_hub, commit_message=f"Add {meta['student']} ({meta['target']}) exported by deit-distill")
    return out


def _load(export_dir: Path, format: str, head: str | None) -> tuple[dict[str, Any], DistilledStudent, str, tuple]:
    """``(config.json with its preprocessing, student, head, the family's conversion)`` of the export
    folder; one line for a joint head the target library cannot carry."""
    info = read_export_config(export_dir)
    model = students.load_student(export_dir).eval()
    # A student without a distillation token has one head: every head is its class head.
    head = "cls" if not model.has_dist_token else (head or model.eval_head)
    plan = _plan(model, format, head)
    if head == "joint" and model.joint != "logits":
        raise ExportError(
            f"student {info['student']['name']!r} predicts with the average of its two heads' softmax outputs "
            "(student.joint=softmax), which timm's and transformers' distilled DeiT cannot carry (they average "
            "the logits); export one head with --head cls or --head dist (`distill eval` reports each head's top-1)")
    return with_default_preprocessing(info, _input_shape(format, plan)[1]), model, head, plan


# --------------------------------------------------------------------------------------------------
# The family's conversion, checked for forgotten tensors
# --------------------------------------------------------------------------------------------------


def _plan(model: DistilledStudent, format: str, head: str) -> tuple:
    """The family's conversion (``to_timm`` or ``to_hf``) of ``model`` outputting ``head``, every
    tensor accounted for."""
    weights = ExportWeights(model.state_dict())
    try:
        plan = model.to_timm(head, weights) if format == "timm" else model.to_hf(head, weights)
    except StudentError as e:  # no equivalent, or not for this head
        raise ExportError(str(e)) from None
    weights.check_all_used()
    return plan


def _input_shape(format: str, plan: tuple) -> tuple[int, int, int]:
    """(channels, height, width) the converted model takes, from its timm model args or HF config."""
    if format == "timm":
        args = plan[1]
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return args.get("in_chans", 3), h, w
    config = plan[3]
    return config["num_channels"], config["image_size"], config["image_size"]


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


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


def _write_timm(plan: tuple, model: nn.Module, info: dict[str, Any], folder: Path) -> dict[str, Any]:
    import timm
    from timm.models._hub import save_for_hf  # not re-exported by timm.models before 1.0.2x

    arch, args, state = plan
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


def hf_image_processor_config(info: dict[str, Any], model_type: str, processor: str = "timm") -> dict[str, Any]:
    """``preprocessor_config.json`` that reproduces our eval transform (``HF_PROCESSORS``).

    ``timm``: ``TimmWrapperImageProcessor`` with the timm data config of :func:`timm_data_config`,
    so transformers runs timm's own eval transform: exact for every image size.
    ``transformers``, ``deit`` style: the short side to ``floor(img_size / crop_pct)`` (bicubic), then a
    center crop. ``DeiTImageProcessor``/``ViTImageProcessor`` only take a ``shortest_edge`` size from
    transformers 5 on, so this is written as ``BitImageProcessor``, which does exactly that in 4.x
    and 5.x (PIL backend). ``small``: resize to ``img_size`` x ``img_size`` (no-op for images already
    that size) with the model's own processor.
    """
    if processor == "timm":
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in timm_data_config(info).items()}
        return dict(image_processor_type="TimmWrapperImageProcessor", pretrained_cfg=cfg)
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
    # do_convert_rgb: greyscale and RGBA images would otherwise reach the 3-channel normalisation as
    # they are (ValueError: mean must have 1 elements); `distill eval` converts every image to RGB.
    return dict(image_processor_type=cls, do_resize=True, size={"height": size, "width": size},
                do_center_crop=False, crop_size={"height": size, "width": size}, do_convert_rgb=True, **common)


def _write_hf(plan: tuple, model: nn.Module, info: dict[str, Any], folder: Path, processor_kind: str) -> dict[str, Any]:
    model_type, arch, state, family_config = plan
    names = list(info.get("class_names") or [f"LABEL_{i}" for i in range(model.num_classes)])
    config = {"architectures": [arch], "model_type": model_type, **family_config,
              "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # transformers refuses safetensors files without this metadata
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = hf_image_processor_config(info, model_type, processor_kind)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return {"target": f"transformers {arch}", "architecture": arch, "image_processor": processor["image_processor_type"],
            "hf_processor": processor_kind}


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


def _verify(format: str, model: nn.Module, head: str, folder: Path, meta: dict, plan: tuple,
            info: dict[str, Any]) -> float | None:
    if format == "timm":
        target = load_timm_export(folder)
        run: Callable[[torch.Tensor], torch.Tensor] = target
    else:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return None  # nothing to check against; the tests check this path where transformers is installed
        if meta["hf_processor"] == "timm":  # the transformers processor's one-pixel crop is documented, not checked
            _verify_processor(folder, info)
        target = load_hf_export(folder)
        run = lambda x: target(pixel_values=x).logits  # noqa: E731
    x = torch.randn(2, *_input_shape(format, plan), generator=torch.Generator().manual_seed(0))
    expected, got = student_output(model, head, x), run(x)
    diff, tol = (expected - got).abs().max().item(), VERIFY_RTOL * max(1.0, expected.abs().max().item())
    if not diff <= tol:
        raise ExportError(f"the exported {meta['target']} gives logits {diff:.1e} away from the student's "
                          f"(> {tol:.0e}); nothing was written. Please report this with your timm/transformers "
                          "versions, or pass --no-verify to write the folder anyway")
    return diff


def _verify_processor(folder: Path, info: dict[str, Any]) -> None:
    """The folder's image processor, loaded back by transformers, must give `distill eval`'s tensors.
    Checked on an image whose resized long side leaves a margin of 4k + 3 pixels, where a crop that
    rounds the other way than torchvision's would sit one pixel off."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    size, short = info["img_size"], math.floor(info["img_size"] / info["crop_pct"])
    long = size + 3 + 4 * max(0, math.ceil((short - size - 3) / 4))  # >= the short side, margin 4k + 3
    pixels = np.random.default_rng(0).integers(0, 256, (long, short, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notice that this processor has no torchvision backend is noise here
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder))
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    finally:
        hf_logging.set_verbosity(level)
    ours = eval_transform(info)(image)
    if theirs.shape != ours.shape or not torch.equal(theirs, ours):
        raise ExportError(f"the exported image processor ({type(processor).__name__}) does not reproduce `distill eval`'s "
                          "input tensors; nothing was written. Please report this with your timm/transformers versions, "
                          "or pass --hf-processor transformers")


# --------------------------------------------------------------------------------------------------
# Model card and upload
# --------------------------------------------------------------------------------------------------

_HEAD_TEXT = {
    "joint": "the average of the class and distillation heads' logits (DeiT's joint classifier, official code)",
    "cls": "the class head",
    "dist": "the distillation head",
}

#: How `distill eval` turns any image it reads into 8-bit RGB (``distill.images.to_rgb``), for the model card:
#: timm's transform needs RGB input, and transformers' processor composites transparency onto white
#: and clips 16-bit values where deit-distill drops the alpha channel and scales to 8 bits.
TO_RGB = (
    'if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit or float: scaled, not clipped\n'
    '    full = 1.0 if image.mode == "F" else 65535.0\n'
    '    image = Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float64) * (255.0 / full)), 0, 255)'
    '.astype(np.uint8))\n'
    'image = image.convert("RGB")  # greyscale, RGBA (alpha dropped), palette: RGB, as deit-distill reads images'
)


def _rule_text(meta: dict) -> str:
    """What the student itself predicts with (its eval-mode forward)."""
    if not meta["has_dist_token"]:
        return "its one head"
    if meta["eval_head"] != "joint":
        return _HEAD_TEXT[meta["eval_head"]].replace("the ", "its ", 1)
    if meta["joint"] == "softmax":
        return "the average of its two heads' softmax outputs (`student.joint=softmax`, the DeiT paper's text)"
    return "the average of its two heads' logits (`student.joint=logits`, the official DeiT code)"


def _model_card(meta: dict, info: dict, repo: str | None, folder: Path) -> str:
    names = info.get("class_names") or []
    where = f"hf-hub:{repo}" if repo else f"local-dir:{folder}"
    read = f'image = Image.open("image.png")\n{TO_RGB}\n'
    if meta["format"] == "timm":
        library = "timm"
        usage = ("import numpy as np\nimport timm\nimport torch\nfrom PIL import Image\n\n"
                 f"model = timm.create_model(\"{where}\", pretrained=True).eval()\n"
                 "cfg = timm.data.resolve_data_config({}, model=model)\n"
                 "transform = timm.data.create_transform(**cfg)  # the student's eval transform; it needs RGB images\n"
                 f"{read}with torch.no_grad():\n    logits = model(transform(image).unsqueeze(0))")
    else:
        library = "transformers"
        source = repo or str(folder)
        load = (f"processor = AutoImageProcessor.from_pretrained(\"{source}\")  # timm's eval transform (needs timm)\n"
                if meta.get("hf_processor") == "timm" else
                f"processor = AutoImageProcessor.from_pretrained(\"{source}\", backend=\"pil\")  # PIL resizing, as in training\n")
        usage = ("import numpy as np\nimport torch\nfrom PIL import Image\n"
                 f"from transformers import AutoImageProcessor, {meta['architecture']}\n\n"
                 f"{load}"
                 f"model = {meta['architecture']}.from_pretrained(\"{source}\").eval()\n"
                 f"{read}with torch.no_grad():\n    logits = model(**processor(image, return_tensors=\"pt\")).logits")
    shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
    return (
        f"---\nlibrary_name: {library}\npipeline_tag: image-classification\ntags:\n- image-classification\n"
        f"- {library}\n- deit-distill\n---\n"
        f"# {repo.split('/')[-1] if repo else meta['student']}\n\n"
        f"A `{meta['student']}` student trained with deit-distill "
        f"(distillation: {info.get('distill', 'unknown')}), exported as {meta['target']}. "
        f"It outputs {_HEAD_TEXT[meta['head']]}. The student itself predicts with {_rule_text(meta)}.\n\n"
        f"- classes ({len(names)}): {shown or 'unnamed'}\n"
        f"- input: {info['img_size']}x{info['img_size']} RGB, eval transform `{info['transform']}`, "
        f"mean {list(info['mean'])}, std {list(info['std'])}; images are converted to 8-bit RGB first, "
        "as in the snippet (16-bit images are scaled, not clipped)\n\n"
        f"```python\n{usage}\n```\n"
    )
