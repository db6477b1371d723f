"""`distill predict`: the same tensors and predictions as `distill eval` on the same images, every head,
images decoded as training decodes them (greyscale, palette, RGBA, 16-bit), JSON/CSV output, one-line errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distill
import students
from distill.cli import main as cli
from distill.sources import DataError
from distill.evaluation import evaluate_run
from distill.rundir import load_run, prepare_eval
from distill.prediction import PredictError, predict
from distill.loop import train

from conftest import make_config

# A random student (its predictions vary from image to image) in our export format, 4 named classes.
INFO = dict(class_names=["class_0", "class_1", "class_2", "class_3"], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
            img_size=16, transform="small", crop_pct=0.875, distill="hard")


@pytest.fixture(scope="module")
def run(tiny_dataset, trained_teacher, tmp_path_factory) -> Path:
    """A finished (one-epoch) distilled run on the tiny dataset."""
    out = tmp_path_factory.mktemp("predict_runs")
    train(make_config(tiny_dataset, out, teacher={"checkpoint": str(trained_teacher)}, train={"epochs": 1}))
    return out / "tiny"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = students.create_student("deit_tiny", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():  # heads far from their near-zero init: probabilities far from uniform
        for head in (model.head, model.head_dist):
            head.weight.normal_(0, 1)
    return students.save_student(model, tmp_path_factory.mktemp("student") / "export", **INFO)


def _eval_heads(path: Path, data: Path, split: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each head's softmax per row exactly as `distill eval --data --split` computes it, and each row's file."""
    loaded = load_run(path, data=str(data), split=split)
    accelerator, model, loader = prepare_eval(loaded, batch_size=5, num_workers=0, cpu=True)
    model.eval()  # as evaluate() does: no drop path
    probs: dict[str, list] = {}
    with torch.no_grad():
        for x, _, _ in loader:
            heads = model.heads(x)
            for name, logits in heads.items():
                probs.setdefault(name, []).append(logits.softmax(1))
    dataset = loader.dataset.dataset  # WithIndex -> ImageClassificationDataset
    files = [dataset.dataset[i][dataset.image_column]["path"] for i in range(len(dataset))]
    return {k: torch.cat(v) for k, v in probs.items()}, files


@pytest.fixture(scope="module")
def evaluated(run, tiny_dataset):
    """`distill eval --data <tiny dataset> --split validation` of the run: per-row probabilities, files, metrics."""
    expected, files = _eval_heads(run, tiny_dataset, "validation")
    return expected, files, evaluate_run(str(run), data=str(tiny_dataset), split="validation", num_workers=0, cpu=True)


@pytest.mark.parametrize("head", ["joint", "cls", "dist"])
def test_predict_equals_eval_on_the_same_images(run, tiny_dataset, evaluated, head):
    expected, files, metrics = evaluated
    got = predict(run, tiny_dataset, split="validation", head=head, top_k=4, batch_size=3, cpu=True)
    assert got["head"] == head and got["top_k"] == 4 and len(got["predictions"]) == len(files) == 16
    for row, p, file in zip(got["predictions"], expected[head], files):
        assert row["classes"][0]["index"] == int(p.argmax())
        assert np.allclose([t["probability"] for t in row["classes"]], p.sort(descending=True).values.tolist(), atol=1e-6)
        assert row["label"] == Path(file).parent.name  # its class folder
    assert got["top1"] == metrics[f"{head}_top1"]

    # The same images given as a folder of files: the same probabilities, file by file.
    by_file = {r["input"]: r for r in predict(run, tiny_dataset / "val", head=head, top_k=4, cpu=True)["predictions"]}
    assert len(by_file) == 16
    for file, p in zip(files, expected[head]):
        probs = [t["probability"] for t in by_file[file]["classes"]]
        assert np.allclose(probs, p.sort(descending=True).values.tolist(), atol=1e-6)


def test_default_head_is_the_one_the_student_predicts_with(run, tiny_dataset, trained_teacher, tmp_path):
    image = tiny_dataset / "val" / "class_2" / "1.png"
    assert predict(run, image)["head"] == "joint"
    train(make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, distill={"kind": "none"},
                      train={"epochs": 1, "run_name": "alone"}))
    alone = predict(tmp_path / "alone", image, top_k=2)
    assert alone["head"] == "cls"  # trained without a teacher: its distillation head is untrained
    export_cls = predict(tmp_path / "alone" / "export", image, top_k=2, head="cls")
    assert alone["predictions"][0]["classes"] == export_cls["predictions"][0]["classes"]


def test_top_k_probabilities_and_names(student, tiny_dataset):
    files = sorted((tiny_dataset / "val" / "class_1").glob("*.png"))
    result = distill.predict(student, [str(f) for f in files], top_k=10)  # more than the 4 classes: all 4
    assert result["top_k"] == 4 and [r["input"] for r in result["predictions"]] == [str(f) for f in files]
    model = students.load_student(student).eval()
    for row in result["predictions"]:
        probs = [t["probability"] for t in row["classes"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert [t["class"] for t in row["classes"]] == [INFO["class_names"][t["index"]] for t in row["classes"]]
    # The eval transform the export records (small: no resize at 16x16, then the export's mean/std).
    x = (torch.from_numpy(np.array(Image.open(files[0]).convert("RGB"))).permute(2, 0, 1).float() / 255
         - torch.tensor(INFO["mean"])[:, None, None]) / torch.tensor(INFO["std"])[:, None, None]
    with torch.no_grad():
        expected = model(x[None]).softmax(1)[0]
    assert np.allclose([t["probability"] for t in result["predictions"][0]["classes"]],
                       expected.sort(descending=True).values.tolist(), atol=1e-6)
    # Each image is computed on its own (not one answer for all).
    assert len({r["classes"][0]["probability"] for r in predict(student, tiny_dataset / "val")["predictions"]}) > 8


def _rgb_twin(tmp_path: Path, name: str, image: Image.Image, rgb: np.ndarray) -> tuple[Path, Path]:
    image.save(tmp_path / f"{name}.png")
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(tmp_path / f"{name}_rgb.png")
    return tmp_path / f"{name}.png", tmp_path / f"{name}_rgb.png"


def test_greyscale_palette_rgba_and_16_bit_images_work_as_in_training(student, tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    wide = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    scaled = np.rint(wide * (255.0 / 65535)).astype(np.uint8)  # 16 bits scaled, not clipped, to 8
    palette = Image.fromarray(grey, mode="L").convert("P")
    palette.info["transparency"] = 0
    pairs = [
        _rgb_twin(tmp_path, "grey", Image.fromarray(grey, mode="L"), np.stack([grey] * 3, -1)),
        _rgb_twin(tmp_path, "rgba", Image.fromarray(rgba, mode="RGBA"), rgba[..., :3]),  # alpha dropped
        _rgb_twin(tmp_path, "wide", Image.fromarray(wide), np.stack([scaled] * 3, -1)),
        _rgb_twin(tmp_path, "palette", palette, np.asarray(palette.convert("RGBA").convert("RGB"))),
    ]
    with Image.open(pairs[2][0]) as img:
        assert img.mode.startswith("I")  # the file really is 16-bit
    for image, twin in pairs:
        a, b = (predict(student, f, top_k=4)["predictions"][0]["classes"] for f in (image, twin))
        assert a == b, image.name


def test_pil_images_and_output_files(student, tiny_dataset, tmp_path, capsys):
    image = Image.open(tiny_dataset / "val" / "class_3" / "0.png")
    from_file = predict(student, tiny_dataset / "val" / "class_3" / "0.png", top_k=3)["predictions"][0]["classes"]
    assert predict(student, image, top_k=3)["predictions"][0]["classes"] == from_file

    assert cli(["predict", str(student), str(tiny_dataset / "val"), "--top-k", "2", "--json", str(tmp_path / "p.json"),
                "--csv", str(tmp_path / "p.csv")]) == 0
    assert "wrote 16 predictions (joint head)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved == json.loads(json.dumps(predict(student, tiny_dataset / "val", top_k=2)))
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 16 and list(rows[0]) == ["input", "class_1", "probability_1", "class_2", "probability_2"]
    for row, rec in zip(rows, saved["predictions"]):
        assert row["input"] == rec["input"] and row["class_1"] == rec["classes"][0]["class"]
        assert abs(float(row["probability_2"]) - rec["classes"][1]["probability"]) < 1e-5

    assert cli(["predict", str(student), str(tiny_dataset / "val" / "class_0" / "0.png"), "--top-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tiny_dataset / 'val' / 'class_0' / '0.png'}: ") and line.count("%)") == 3


def test_labelled_dataset_prints_its_accuracy(run, tiny_dataset, evaluated, tmp_path, capsys):
    assert cli(["predict", str(run), str(tiny_dataset), "--split", "validation", "--csv", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    top1 = evaluated[2]["joint_top1"]
    assert f"top-1 of the joint head: {top1:.2f}% on 16 labelled images" in out
    assert next(csv.DictReader((tmp_path / "p.csv").open()))["label"] == "class_0"


def test_bad_input_is_one_line(run, student, tiny_dataset, tmp_path):
    image = tiny_dataset / "val" / "class_0" / "0.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict(student, tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict(tmp_path / "no_run", image)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt is not an image that can be read"):
        predict(student, tmp_path / "notes.txt")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("name: tiny\n")
    with pytest.raises(PredictError, match="has not finished .*--resume"):
        predict(stopped, image)
    with pytest.raises(PredictError, match="--top-k must be a positive integer"):
        predict(student, image, top_k=0)
    with pytest.raises(PredictError, match="unknown head 'both'"):
        predict(student, image, head="both")
    with pytest.raises(PredictError, match="--split applies to a dataset"):
        predict(student, image, split="val")
    with pytest.raises(PredictError, match="is a dataset; pass it alone"):
        predict(student, [str(tiny_dataset / "val" / "class_0" / "0.png"), "uoft-cs/cifar10"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds no images"):
        predict(student, tmp_path / "empty")
    for e in (FileNotFoundError, DataError, PredictError):
        assert issubclass(e, (FileNotFoundError, ValueError))  # what the CLI turns into one `error:` line
