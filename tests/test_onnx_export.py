"""`distill export --format onnx`: a graph onnxruntime runs with the student's logits (max abs diff <= 1e-4,
same top-1) on real images at any batch size, for every student family and head; `distill predict` runs it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import students
from distill.cli import main as cli
from distill.export import MARKER, ExportError, export_student
from distill.prediction import predict
from distill.exportdir import eval_transform, student_output
from distill.loop import train

from conftest import make_config

NEEDS_ONNX = "the ONNX export needs the onnx extra: pip install 'deit-distill[onnx]'"
for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=NEEDS_ONNX)
import onnxruntime as ort  # noqa: E402

from distill.onnx_export import ATOL, META_NAME, ONNX_NAME  # noqa: E402

INFO = dict(class_names=["cat", "dog", "ship", "frog"], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], img_size=16,
            transform="small", crop_pct=0.875, distill="hard")
FAMILIES = {
    "deit_tiny": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    "vit_tiny": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    "cait_xxs24": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    "cmt_ti": dict(img_size=32, depths=(1, 1, 1, 1)),
    "dhvt_tiny_cifar_p4": dict(img_size=16, depth=2),
}


@pytest.fixture(scope="module")
def run(tiny_dataset, trained_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx_runs")
    train(make_config(tiny_dataset, out, teacher={"checkpoint": str(trained_teacher)}, train={"epochs": 1}))
    return out / "tiny"


def _save(name: str, root: Path, **extra) -> Path:
    torch.manual_seed(0)
    args = FAMILIES[name]
    model = students.create_student(name, num_classes=4, **args)
    for key, value in extra.items():
        setattr(model, key, value)
    info = {**INFO, "img_size": args["img_size"]}
    return students.save_student(model, root / name, **info)


def _real_images(tiny_dataset: Path, prep: dict, n: int = 5) -> torch.Tensor:
    files = sorted((tiny_dataset / "val").rglob("*.png"))[::3][:n]
    transform = eval_transform(prep)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def _onnx_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(folder / ONNX_NAME), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])


def _check(folder: Path, export: Path, head: str, x: torch.Tensor) -> None:
    model = students.load_student(export).eval()
    with torch.no_grad():
        expected = student_output(model, head, x)
    for batch in (x, x[:1]):  # the batch axis is dynamic
        got = _onnx_logits(folder, batch)
        assert got.shape == (batch.shape[0], 4)
        assert (got - expected[: batch.shape[0]]).abs().max().item() <= ATOL
        assert torch.equal(got.argmax(1), expected[: batch.shape[0]].argmax(1))


@pytest.mark.parametrize("name", ["deit_tiny", "vit_tiny", "cait_xxs24",
                                  pytest.param("cmt_ti", marks=pytest.mark.slow),
                                  pytest.param("dhvt_tiny_cifar_p4", marks=pytest.mark.slow)])
def test_every_family_exports_with_the_students_logits(name, tiny_dataset, tmp_path):
    export = _save(name, tmp_path)
    out = export_student(export, "onnx")
    assert out == export.with_name(f"{name}_onnx")
    assert sorted(p.name for p in out.iterdir()) == sorted([ONNX_NAME, META_NAME, MARKER])
    meta = json.loads((out / META_NAME).read_text())
    marker = json.loads((out / MARKER).read_text())
    model = students.load_student(export)
    assert meta["class_names"] == INFO["class_names"] and meta["head"] == model.eval_head == "joint"
    assert meta["preprocessing"]["img_size"] == FAMILIES[name]["img_size"]
    assert {k: meta["preprocessing"][k] for k in ("transform", "mean", "std")} == {k: INFO[k] for k in ("transform", "mean", "std")}
    assert meta["input"]["shape"][0] == "batch" and marker["checked_max_abs_diff"] <= ATOL
    assert "random inputs" in marker["checked_on"]  # this export folder names no data it could read
    _check(out, export, "joint", _real_images(tiny_dataset, meta["preprocessing"]))


@pytest.mark.parametrize("head", ["cls", pytest.param("dist", marks=pytest.mark.slow)])
def test_each_head_and_the_softmax_joint_rule(head, tiny_dataset, tmp_path):
    export = _save("deit_tiny", tmp_path)
    out = export_student(export, "onnx", head=head, out=tmp_path / "out")
    assert json.loads((out / META_NAME).read_text())["head"] == head
    _check(out, export, head, _real_images(tiny_dataset, {**INFO}))
    if head == "cls":
        paper = _save("deit_tiny", tmp_path / "softmax", joint="softmax")
        out = export_student(paper, "onnx", out=tmp_path / "softmax_out")
        _check(out, paper, "joint", _real_images(tiny_dataset, {**INFO}))
        model = students.load_student(paper).eval()
        x = _real_images(tiny_dataset, {**INFO})
        with torch.no_grad():  # log of the averaged softmax outputs, not averaged logits
            assert torch.allclose(_onnx_logits(out, x).exp(), (model.forward_heads(x)[0].softmax(1)
                                                                  + model.forward_heads(x)[1].softmax(1)) / 2, atol=1e-5)


def test_run_export_is_checked_on_its_validation_images_and_predict_runs_it(run, tiny_dataset, capsys):
    assert cli(["export", str(run), "--format", "onnx"]) == 0
    out = run / "export_onnx"
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: ONNX (opset ") and "joint head; logits match the student's" in line
    assert line.endswith(f"on 8 validation images of {tiny_dataset}")
    _check(out, run / "export", "joint", _real_images(tiny_dataset, json.loads((out / META_NAME).read_text())["preprocessing"], 16))

    # `distill predict` takes the folder or the .onnx file, with the same answers as the student.
    ours = predict(run, tiny_dataset, split="validation", top_k=4, cpu=True)
    for model in (out, out / ONNX_NAME):
        theirs = predict(model, tiny_dataset, split="validation", top_k=4)
        assert theirs["kind"] == "onnx" and theirs["head"] == "joint" and theirs["top1"] == ours["top1"]
        for a, b in zip(ours["predictions"], theirs["predictions"]):
            assert [t["index"] for t in a["classes"]] == [t["index"] for t in b["classes"]]
            assert np.allclose([t["probability"] for t in a["classes"]], [t["probability"] for t in b["classes"]], atol=1e-5)
    assert cli(["export", str(run), "--format", "onnx"]) == 0  # a previous ONNX export is replaced


def test_bad_inputs_and_failed_checks_write_nothing(tmp_path, monkeypatch):
    import distill.onnx_export as onnx_export

    export = _save("deit_tiny", tmp_path)
    with pytest.raises(ExportError, match="--head joint"):
        export_student(export, "onnx", head="both")
    monkeypatch.setattr(onnx_export, "ATOL", -1.0)  # no logits can pass: the check must stop the export
    with pytest.raises(ExportError, match="onnxruntime gives logits .* nothing was written"):
        export_student(export, "onnx", out=tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))
    monkeypatch.undo()

    out = export_student(export, "onnx", head="cls", out=tmp_path / "cls")
    some_image = _any_png(tmp_path)
    with pytest.raises(ValueError, match="outputs the cls head only; export the joint head with"):
        predict(out, some_image, head="joint")
    (out / META_NAME).unlink()
    with pytest.raises(ValueError, match="model.json .* is missing or damaged"):
        predict(out / ONNX_NAME, some_image)

    import builtins
    real_import = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(ExportError, match=r"--format onnx needs onnxscript: pip install deit-distill\[onnx\]"):
        export_student(export, "onnx", out=tmp_path / "never")


def _any_png(root: Path) -> Path:
    path = root / "any.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    return path
