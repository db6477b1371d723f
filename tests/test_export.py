"""`distill export`: timm and 🤗 transformers folders that load with those libraries alone and give
the student's logits (max abs diff < 1e-5), for random and trained tiny DeiT/ViT/CaiT students."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import distill
import distill.export as export
import students
from distill.cli import main as cli
from distill.config import Config
from distill.recipes import update
from distill.export import MARKER, ExportError, export_student, load_hf_export, load_timm_export, resolve_out
from distill.transforms import build_transform

from conftest import tiny_config

TOL = 1e-5
SMALL = dict(num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
INFO = dict(class_names=["cat", "dog", "ship", "frog"], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], img_size=16,
            transform="small", crop_pct=0.875, distill="hard")
NEEDS_TRANSFORMERS = "the hf export is checked by loading it with transformers: pip install 'deit-distill[hf]'"


def _transformers():
    return pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)


def _pil_backend(transformers) -> dict:
    # transformers 5 resizes with torchvision tensors unless asked for PIL; 4.x's default is PIL.
    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}


def _batch(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised tiny students in our export format (`students.save_student`), by name."""
    root = tmp_path_factory.mktemp("students")
    folders = {}
    for name in ("deit_tiny", "vit_tiny", "cait_xxs24"):
        torch.manual_seed(0)
        folders[name] = students.save_student(students.create_student(name, **SMALL), root / name, **INFO)
    return folders


@pytest.fixture(scope="module", params=["deit_tiny", "vit_tiny"])
def trained_run(request, tiny_dataset, tmp_path_factory) -> Path:
    """A tiny student trained for one epoch without a teacher: it predicts with its class head."""
    out = tmp_path_factory.mktemp("runs")
    raw = tiny_config(tiny_dataset, out)
    raw["student"]["name"] = request.param
    raw["teacher"] = {"name": None}
    raw["distill"] = {"kind": "none"}
    raw["train"].update(epochs=1, run_name="alone")
    cfg = Config(name="alone")
    update(cfg, raw)
    distill.train(cfg)
    return out / "alone"


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, head, arch", [
    ("deit_tiny", "joint", "deit_tiny_distilled_patch16_224"),
    ("deit_tiny", "cls", "deit_tiny_patch16_224"),
    ("deit_tiny", "dist", "deit_tiny_patch16_224"),
    ("vit_tiny", None, "vit_tiny_patch16_224"),
    ("cait_xxs24", "cls", "cait_xxs24_224"),
    ("cait_xxs24", "dist", "cait_xxs24_224"),
])
def test_timm_export_loads_in_timm_with_our_logits(saved, tmp_path, name, head, arch):
    out = export_student(saved[name], "timm", out=tmp_path / "timm", head=head)
    ours = students.load_student(saved[name]).eval()
    x = _batch()
    with torch.no_grad():
        want = ours.heads(x)[head or "cls"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["num_classes"] == 4
    assert cfg["label_names"] == INFO["class_names"]
    assert cfg["model_args"]["embed_dim"] == 32 and cfg["model_args"]["patch_size"] == 4
    pretrained = cfg["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 16, 16]
    assert (pretrained["mean"], pretrained["std"]) == (INFO["mean"], INFO["std"])
    assert "tag" not in pretrained and "license" not in pretrained  # not the ImageNet checkpoint's

    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # The architecture name + the file: pretrained_cfg carries num_classes, without which timm
    # would drop the head as "another class count" and load the rest non-strictly.
    by_name = timm.create_model(arch, pretrained=True, **cfg["model_args"],
                                pretrained_cfg_overlay=dict(pretrained, file=str(out / "model.safetensors"))).eval()
    fresh = timm.create_model(arch, **cfg["model_args"]).eval()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    with torch.no_grad():
        for model in (by_folder, by_name, fresh):
            assert _max_diff(model(x), want) < TOL
    assert not by_folder.training


def test_timm_cls_export_keeps_the_distillation_token(saved, tmp_path):
    """Dropping the distillation token would change the class head: it is kept as timm's register token."""
    out = export_student(saved["deit_tiny"], "timm", out=tmp_path / "t", head="cls")
    weights = load_file(str(out / "model.safetensors"))
    ours = load_file(str(saved["deit_tiny"] / "model.safetensors"))
    assert torch.equal(weights["reg_token"], ours["dist_token"])
    assert "head_dist.weight" not in weights and torch.equal(weights["head.weight"], ours["head.weight"])
    model = students.load_student(saved["deit_tiny"]).eval()
    plain = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                              num_heads=2, num_classes=4).eval()  # the same model without that token
    plain.load_state_dict({k: v for k, v in weights.items() if k != "reg_token"} | {
        "pos_embed": torch.cat([weights["pos_embed"][:, :1], weights["pos_embed"][:, 2:]], dim=1)})
    x = _batch()
    with torch.no_grad():
        assert _max_diff(plain(x), model.forward_heads(x)[0]) > 1e-3


@pytest.mark.parametrize("style", ["deit", "small"])
def test_timm_data_config_rebuilds_our_eval_transform(saved, tmp_path, style):
    student = students.load_student(saved["deit_tiny"])
    info = dict(INFO, transform=style, img_size=16, crop_pct=0.875)
    src = students.save_student(student, tmp_path / "src", **info)
    model = load_timm_export(export_student(src, "timm", out=tmp_path / "timm"))
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    ours = build_transform(16, False, style=style, crop_pct=0.875, mean=INFO["mean"], std=INFO["std"])
    for w, h in [(16, 16), (40, 40), (40, 30), (33, 50), (12, 20)]:
        img = _image(w, h)
        assert _max_diff(theirs(img), ours(img)) < 1e-6, (w, h)


# --------------------------------------------------------------------------------------------------
# 🤗 transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, head, arch, n_fixed", [
    ("deit_tiny", "joint", "DeiTForImageClassificationWithTeacher", 11),
    ("deit_tiny", "cls", "DeiTForImageClassification", 9),
    ("deit_tiny", "dist", "DeiTForImageClassification", 9),
    ("vit_tiny", None, "ViTForImageClassification", 8),
])
def test_hf_export_loads_in_transformers_with_our_logits(saved, tmp_path, name, head, arch, n_fixed):
    transformers = _transformers()
    out = export_student(saved[name], "hf", out=tmp_path / "hf", head=head)
    # The tensors transformers stores for a ViT/DeiT: fixed ones + 16 per block (qkv split in three).
    assert len(load_file(str(out / "model.safetensors"))) == n_fixed + 16 * SMALL["depth"]
    model, report = getattr(transformers, arch).from_pretrained(str(out), output_loading_info=True)
    assert not any(report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
    auto = transformers.AutoModelForImageClassification.from_pretrained(str(out))
    assert type(auto).__name__ == arch
    assert model.config.id2label == dict(enumerate(INFO["class_names"]))
    assert model.config.layer_norm_eps == 1e-6
    ours = students.load_student(saved[name]).eval()
    x = _batch()
    with torch.no_grad():
        want = ours.heads(x)[head or "cls"]
        assert _max_diff(model.eval()(pixel_values=x).logits, want) < TOL
        assert _max_diff(auto.eval()(pixel_values=x).logits, want) < TOL


def test_hf_layer_norm_eps_matters(saved, tmp_path):
    """transformers' default eps (1e-12) instead of timm's 1e-6 moves the logits: the export sets it."""
    transformers = _transformers()
    out = export_student(saved["deit_tiny"], "hf", out=tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "layer_norm_eps"}))
    model = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(str(out)).eval()
    ours = students.load_student(saved["deit_tiny"]).eval()
    x = _batch()
    with torch.no_grad():
        assert _max_diff(model(pixel_values=x).logits, ours(x)) > TOL


#: Image sizes (width, height) for the processors. At 16 px, crop_pct 0.875 (short side 18), the
#: timm processor must be exact on all of them; the transformers one is exact only where the resized
#: long side leaves no margin of 4k + 3 pixels, which these avoid.
EVEN_MARGINS = [(16, 16), (40, 40), (40, 30), (30, 47), (37, 61), (12, 20)]


@pytest.mark.parametrize("processor_kind, style, sizes", [
    ("timm", "deit", EVEN_MARGINS + [(33, 50), (50, 33), (18, 21), (13, 29), (101, 37)]),
    ("timm", "small", [(16, 16), (40, 30), (33, 50), (12, 20)]),
    ("transformers", "deit", EVEN_MARGINS),
    ("transformers", "small", [(16, 16), (40, 30), (33, 50), (12, 20)]),
])
def test_hf_image_processor_equals_our_eval_transform(saved, tmp_path, processor_kind, style, sizes):
    transformers = _transformers()
    student = students.load_student(saved["deit_tiny"])
    src = students.save_student(student, tmp_path / "src", **dict(INFO, transform=style))
    out = export_student(src, "hf", out=tmp_path / "hf", hf_processor=processor_kind)
    kwargs = _pil_backend(transformers) if processor_kind == "transformers" else {}
    processor = transformers.AutoImageProcessor.from_pretrained(str(out), **kwargs)
    assert type(processor).__name__.startswith("TimmWrapperImageProcessor" if processor_kind == "timm" else
                                               "BitImageProcessor" if style == "deit" else "DeiTImageProcessor")
    ours = build_transform(16, False, style=style, crop_pct=0.875, mean=INFO["mean"], std=INFO["std"])
    for w, h in sizes:
        img = _image(w, h)
        theirs = processor(img, return_tensors="pt")["pixel_values"][0]
        assert _max_diff(theirs, ours(img)) < 1e-6, (w, h)


def test_default_hf_processor_is_exact_on_every_size(saved, tmp_path):
    """Image sizes from 12 to 40 px a side: the default export's processor gives exactly the tensors
    `distill eval` evaluates, where the transformers processor is one pixel off on some of them."""
    transformers = _transformers()
    src = students.save_student(students.load_student(saved["deit_tiny"]), tmp_path / "src", **dict(INFO, transform="deit"))
    out = export_student(src, "hf", out=tmp_path / "hf")
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "TimmWrapperImageProcessor"
    assert "timm's eval transform (needs timm)" in (out / "README.md").read_text()
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    native = transformers.AutoImageProcessor.from_pretrained(
        str(export_student(src, "hf", out=tmp_path / "native", hf_processor="transformers")), **_pil_backend(transformers))
    ours = build_transform(16, False, style="deit", crop_pct=0.875, mean=INFO["mean"], std=INFO["std"])
    off = 0
    for w in range(12, 41, 3):
        for h in range(12, 41):
            img = _image(w, h)
            want = ours(img)
            assert torch.equal(processor(img, return_tensors="pt")["pixel_values"][0], want), (w, h)
            off += _max_diff(native(img, return_tensors="pt")["pixel_values"][0], want) > 1e-6
    assert off > 0  # the case the default processor exists for is among these sizes


def test_export_checks_its_processor_against_distill_eval(saved, tmp_path, monkeypatch):
    """The processor written is loaded back and compared with `distill eval`'s tensors before the folder
    is moved into place: one that rounds its crop the other way is refused, and nothing is written."""
    _transformers()
    src = students.save_student(students.load_student(saved["deit_tiny"]), tmp_path / "src", **dict(INFO, transform="deit"))
    native = export.hf_image_processor_config
    monkeypatch.setattr(export, "hf_image_processor_config", lambda info, model_type, processor="timm":
                        native(info, model_type, "transformers"))
    with pytest.raises(export.ExportError, match="does not reproduce `distill eval`'s input tensors"):
        export_student(src, "hf", out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unknown_hf_processor_is_one_line(saved, tmp_path):
    with pytest.raises(export.ExportError, match="--hf-processor timm or --hf-processor transformers"):
        export_student(saved["deit_tiny"], "hf", out=tmp_path / "hf", hf_processor="pil")


def test_hf_center_crop_rounds_down_where_torchvision_rounds_half_to_even(saved, tmp_path):
    """With ``hf_processor="transformers"``: a 33x50 image resized to 18x27: 11 rows to cut. torchvision
    (ours, timm) starts the crop at round(5.5) = 6, transformers at 11 // 2 = 5, so the crop sits one
    row higher (why the default processor is timm's)."""
    transformers = _transformers()
    student = students.load_student(saved["deit_tiny"])
    src = students.save_student(student, tmp_path / "src", **dict(INFO, transform="deit"))
    processor = transformers.AutoImageProcessor.from_pretrained(
        str(export_student(src, "hf", out=tmp_path / "hf", hf_processor="transformers")), **_pil_backend(transformers))
    img = _image(33, 50)
    theirs = processor(img, return_tensors="pt")["pixel_values"][0]
    ours = build_transform(16, False, style="deit", crop_pct=0.875, mean=INFO["mean"], std=INFO["std"])(img)
    assert _max_diff(theirs, ours) > 0.1
    assert _max_diff(theirs[:, 1:], ours[:, :-1]) < 1e-6


# --------------------------------------------------------------------------------------------------
# A trained student, without a teacher: its class head is what it predicts with
# --------------------------------------------------------------------------------------------------


def test_trained_student_exports_the_head_it_predicts_with(trained_run, capsys):
    model = students.load_student(trained_run / "export").eval()
    assert model.eval_head == "cls" or not model.has_dist_token  # a ViT's heads are one head
    x = _batch(seed=1)
    with torch.no_grad():
        want = model(x)
        if model.has_dist_token:  # the untrained distillation head would move the joint output
            assert _max_diff(model.heads(x)["joint"], want) > 1e-3

    assert cli(["export", str(trained_run), "--format", "timm"]) == 0  # default --out: <run>/export_timm
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {trained_run / 'export_timm'}") and "logits match" in printed
    with torch.no_grad():
        assert _max_diff(load_timm_export(trained_run / "export_timm")(x), want) < TOL
    joint = export_student(trained_run, "timm", out=trained_run / "joint_timm", head="joint")
    with torch.no_grad():
        assert _max_diff(load_timm_export(joint)(x), model.heads(x)["joint"]) < TOL

    transformers = _transformers()
    assert cli(["export", str(trained_run), "--format", "hf"]) == 0
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(trained_run / "export_hf")).eval()
    assert type(hf).__name__ == ("DeiTForImageClassification" if model.has_dist_token else "ViTForImageClassification")
    assert hf.config.id2label == {i: f"class_{i}" for i in range(4)}
    with torch.no_grad():
        assert _max_diff(hf(pixel_values=x).logits, want) < TOL
    joint = export_student(trained_run, "hf", out=trained_run / "joint_hf", head="joint")
    with torch.no_grad():
        assert _max_diff(load_hf_export(joint)(pixel_values=x).logits, model.heads(x)["joint"]) < TOL
    # Its processor prepares a dataset image exactly as `distill eval` does.
    processor = transformers.AutoImageProcessor.from_pretrained(str(trained_run / "export_hf"))
    info = json.loads((trained_run / "export" / "config.json").read_text())
    img = _image(16, 16, seed=3)
    ours = build_transform(16, False, style=info["transform"], crop_pct=info["crop_pct"], mean=info["mean"], std=info["std"])
    assert _max_diff(processor(img, return_tensors="pt")["pixel_values"][0], ours(img)) < 1e-6


# --------------------------------------------------------------------------------------------------
# What cannot be exported, bad input, the output folder
# --------------------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, kwargs", [
    ("cmt_ti", dict(img_size=32, stem_chans=8, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))),
    ("dhvt_tiny_cifar_p4", dict(img_size=16, embed_dim=32, depth=1, num_heads=2)),
])
def test_students_without_equivalent_give_one_line_errors(tmp_path, name, kwargs):
    src = students.save_student(students.create_student(name, num_classes=4, **kwargs), tmp_path / name, **INFO)
    for fmt in ("timm", "hf"):
        with pytest.raises(ExportError) as e:
            export_student(src, fmt)
        assert "no timm or transformers equivalent" in _one_line(e)
    assert not (tmp_path / f"{name}_timm").exists() and not (tmp_path / f"{name}_hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary folder left behind


def test_cait_exports_one_head_to_timm_only(saved, tmp_path):
    joint = students.save_student(students.load_student(saved["cait_xxs24"]), tmp_path / "cait")  # eval_head joint
    with pytest.raises(ExportError) as e:
        export_student(joint, "timm")
    assert "--head cls" in _one_line(e)
    with pytest.raises(ExportError) as e:
        export_student(joint, "hf", head="cls")
    assert "--format timm" in _one_line(e)


def test_bad_inputs_give_one_line_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_student(tmp_path / "missing", "timm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_student(tmp_path / "empty", "timm")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("name: tiny\n")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        export_student(tmp_path / "unfinished", "timm")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"student": {"name": "deit_tiny",')
    with pytest.raises(ExportError) as e:
        export_student(broken, "timm")
    assert "not valid JSON" in _one_line(e)
    (broken / "config.json").write_text('{"architecture": "deit_tiny_distilled_patch16_224"}')
    with pytest.raises(ExportError) as e:
        export_student(broken, "hf")
    assert "no 'student' entry" in _one_line(e)
    (broken / "teacher.json").write_text("{}")
    with pytest.raises(ExportError, match="teacher, not a student"):
        export_student(broken, "timm")
    with pytest.raises(ExportError, match="--format timm, --format hf or --format onnx"):  # onnx: test_onnx_export.py
        export_student(saved["deit_tiny"], "tflite")
    with pytest.raises(ExportError, match="--head joint"):
        export_student(saved["deit_tiny"], "timm", head="both")


def test_output_folder_is_replaced_only_if_an_export_wrote_it(saved, tmp_path):
    out = tmp_path / "out"
    export_student(saved["deit_tiny"], "hf", out=out)
    assert (out / "preprocessor_config.json").is_file()
    assert set(json.loads((out / MARKER).read_text())["files"]) == {p.name for p in out.iterdir()}
    export_student(saved["deit_tiny"], "timm", out=out)  # a previous export: replaced, nothing stale kept
    assert not (out / "preprocessor_config.json").exists()
    assert json.loads((out / MARKER).read_text())["format"] == "timm"

    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        export_student(saved["deit_tiny"], "timm", out=out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(ExportError, match="not written by `distill export`"):
        export_student(saved["deit_tiny"], "timm", out=foreign)
    assert (foreign / "data.csv").read_text() == "1,2"
    assert resolve_out(saved["deit_tiny"], "hf", None) == saved["deit_tiny"].with_name("deit_tiny_hf")


def test_a_wrong_mapping_is_caught_before_anything_is_written(saved, tmp_path, monkeypatch):
    """The load-back check compares logits: a converter that forgot to swap the tokens for the
    distillation head is refused and the output folder never appears."""
    from students import deit

    monkeypatch.setattr(deit, "_first_token_order", lambda w, head: (w("cls_token"), w("dist_token"), w("pos_embed")))
    with pytest.raises(ExportError) as e:
        export_student(saved["deit_tiny"], "timm", out=tmp_path / "out", head="dist")
    assert "logits" in _one_line(e) and "--no-verify" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Hub upload (offline: the HfApi calls are replaced) and the command line
# --------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_export_folder(saved, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "me/tiny-deit"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return Repo()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, folder_path, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = export_student(saved["deit_tiny"], "timm", out=tmp_path / "t", push_to_hub="me/tiny-deit")
    assert calls[0] == ("create_repo", "me/tiny-deit", {"exist_ok": True})
    assert calls[1] == ("upload_folder", "me/tiny-deit", str(out), ["README.md", "config.json", MARKER, "model.safetensors"])
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and 'timm.create_model("hf-hub:me/tiny-deit", pretrained=True)' in card

    def offline(self, repo_id, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(ExportError) as e:
        export_student(saved["deit_tiny"], "timm", out=tmp_path / "t", push_to_hub="me/tiny-deit")
    assert "hf auth login" in _one_line(e)
    assert (tmp_path / "t" / "model.safetensors").is_file()  # the folder is written either way


def test_cli_errors_are_one_line_with_exit_status_2(saved, tmp_path, capsys):
    assert cli(["export", str(tmp_path / "missing"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "runs/<name>" in err
    src = students.save_student(students.load_student(saved["cait_xxs24"]), tmp_path / "cait")
    assert cli(["export", str(src), "--format", "timm"]) == 2
    assert "--head cls" in capsys.readouterr().err
    assert cli(["export", str(src), "--format", "timm", "--head", "cls", "--out", str(tmp_path / "c")]) == 0
    assert "timm cait_xxs24_224, cls head" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# What the student predicts with, and every image `distill eval` reads (issue 17)
# --------------------------------------------------------------------------------------------------


def test_a_softmax_joint_student_is_not_exported_as_the_logit_average(saved, tmp_path):
    """timm's and transformers' distilled DeiT average logits; a student.joint=softmax student
    predicts otherwise, so its joint head is refused (one line naming --head) and one head exported."""
    model = students.load_student(saved["deit_tiny"])
    model.joint = "softmax"
    src = students.save_student(model, tmp_path / "softmax", **INFO)
    x = _batch()
    with torch.no_grad():
        heads = model.eval().heads(x)
        # The two rules really differ here, and the check reproduces the student's own prediction.
        assert _max_diff(heads["joint"], heads["joint_softmax"]) > 1e-3
        assert torch.equal(export.student_output(model, "joint", x), model(x))
        assert torch.equal(export.student_output(model, "joint", x), heads["joint_softmax"])
    for fmt in ("timm", "hf"):
        for head in (None, "joint"):
            with pytest.raises(ExportError) as e:
                export_student(src, fmt, out=tmp_path / "out", head=head)
            message = _one_line(e)
            assert "student.joint=softmax" in message and "--head cls or --head dist" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["softmax"]  # nothing written

    out = export_student(src, "timm", out=tmp_path / "cls", head="cls")
    with torch.no_grad():
        assert _max_diff(load_timm_export(out)(x), heads["cls"]) < TOL
    card = (out / "README.md").read_text()
    assert "It outputs the class head" in card and "student.joint=softmax" in card
    logits_card = (export_student(saved["deit_tiny"], "timm", out=tmp_path / "joint") / "README.md").read_text()
    assert "logits" in logits_card and "student.joint=logits" in logits_card


def _images() -> dict[str, Image.Image]:
    """One image of each kind `distill eval` reads: greyscale, RGBA with transparency, 16-bit."""
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (24, 20, 4), dtype=np.uint8)
    rgba[..., 3] = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
    return {"L": Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8), mode="L"),
            "RGBA": Image.fromarray(rgba, mode="RGBA"),
            "I;16": Image.fromarray(sixteen),
            "I": Image.fromarray(sixteen).convert("I")}  # what PIL opens a 16-bit PNG as


def _as_the_card_says(image: Image.Image) -> Image.Image:
    namespace = {"image": image, "np": np, "Image": Image}
    exec(export.TO_RGB, namespace)  # the conversion the model card tells users to run
    return namespace["image"]


@pytest.mark.parametrize("processor_kind", ["timm", "transformers"])
@pytest.mark.parametrize("style", ["deit", "small"])
def test_exports_preprocess_every_image_distill_eval_reads(saved, tmp_path, style, processor_kind):
    """Greyscale, RGBA and 16-bit images: after the model card's RGB conversion timm's and transformers'
    preprocessing equal our eval transform; transformers' own processor also takes each as it is."""
    from distill.images import to_rgb  # how `distill eval` decodes an image

    transformers = _transformers()
    src = students.save_student(students.load_student(saved["deit_tiny"]), tmp_path / "src",
                                **dict(INFO, transform=style))
    timm_out = export_student(src, "timm", out=tmp_path / "timm")
    hf_out = export_student(src, "hf", out=tmp_path / "hf", hf_processor=processor_kind)
    kwargs = _pil_backend(transformers) if processor_kind == "transformers" else {}
    processor = transformers.AutoImageProcessor.from_pretrained(str(hf_out), **kwargs)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=load_timm_export(timm_out)))
    ours = build_transform(16, False, style=style, crop_pct=0.875, mean=INFO["mean"], std=INFO["std"])
    for out in (timm_out, hf_out):
        card = (out / "README.md").read_text()
        assert export.TO_RGB in card and 'convert("RGB")' in card
    for mode, image in _images().items():
        assert image.mode == mode
        want = ours(to_rgb(image))
        if processor_kind == "transformers":
            assert processor(image, return_tensors="pt")["pixel_values"][0].shape == want.shape, mode  # no error
        rgb = _as_the_card_says(image)
        assert _max_diff(processor(rgb, return_tensors="pt")["pixel_values"][0], want) < 1e-6, mode
        assert _max_diff(timm_transform(rgb), want) < 1e-6, mode
    if processor_kind == "transformers":
        grey = _images()["L"]  # greyscale needs no conversion by hand
        assert _max_diff(processor(grey, return_tensors="pt")["pixel_values"][0], ours(to_rgb(grey))) < 1e-6

