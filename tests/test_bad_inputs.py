"""A catalogue of bad inputs and faults, each driven through the command line as a user would.

Every case must end with a non-zero exit, exactly one line on stderr that starts with ``error:``,
hints that name only options the command really has, and no file of an existing run changed.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import teachers
from distill import checkpoint as ckpt
from distill.cli import COMMANDS, build_parser, main as cli
from distill.config import Config
from distill.recipes import all_keys
from distill.loop import train

from conftest import _write_image_folder, make_config, tiny_config


@dataclass
class World:
    root: Path
    runs: Path
    recipe: Path
    data: Path
    teacher: Path
    finished: Path
    stopped: Path


@pytest.fixture(scope="module")
def world(tiny_dataset, trained_teacher, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    runs = root / "runs"
    raw = tiny_config(tiny_dataset, runs)
    raw["teacher"]["checkpoint"] = str(trained_teacher)
    raw["train"]["epochs"] = 1
    recipe = root / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump(raw))
    teacher = root / "teacher"
    shutil.copytree(trained_teacher.parent, teacher)
    train(make_config(tiny_dataset, runs, teacher={"checkpoint": str(trained_teacher)}, train={"run_name": "finished", "epochs": 1}))
    train(make_config(tiny_dataset, runs, teacher={"checkpoint": str(trained_teacher)},
                      train={"run_name": "stopped", "epochs": 2, "stop_after": 1}))
    return World(root, runs, recipe, tiny_dataset, teacher / "model.safetensors", runs / "finished", runs / "stopped")


def _copy_run(w: World, name: str, new: str) -> Path:
    shutil.copytree(w.runs / name, w.runs / new)
    return w.runs / new


def _folder(w: World, name: str, per_class: dict[str, int], classes: int = 4) -> Path:
    root = w.root / name
    if not root.exists():
        _write_image_folder(root, per_class)
        for c in range(classes, 4):
            for split in per_class:
                shutil.rmtree(root / split / f"class_{c}")
    return root


def _corrupt_folder(w: World) -> Path:
    root = w.root / "corrupt"
    if not root.exists():
        shutil.copytree(w.data, root)
        (root / "train" / "class_1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _single_class_parquet(w: World) -> Path:
    path = w.root / "one_class.parquet"
    if not path.exists():
        import datasets
        images = [Image.fromarray(np.full((16, 16, 3), i * 20, dtype=np.uint8)) for i in range(10)]
        ds = datasets.Dataset.from_dict({"image": images, "label": [0] * 10},
                                        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
        ds.to_parquet(str(path))
    return path


class Unsafe:
    def __reduce__(self):
        return (print, ("unpickled",))


def _pickled_teacher(w: World) -> Path:
    path = w.root / "teacher.pkl.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Unsafe()}, f, protocol=2)  # a global callable: needs full unpickling
    return path


def _wrong_class_teacher(w: World) -> Path:
    path = w.root / "seven.safetensors"
    from safetensors.torch import save_file
    save_file(teachers.build_teacher_network("resnet20_cifar", num_classes=7)[0].state_dict(), str(path))
    return path


def _other_classes_teacher(w: World) -> Path:
    folder = w.root / "renamed_teacher"
    if not folder.exists():
        shutil.copytree(w.teacher.parent, folder)
        meta = json.loads((folder / "teacher.json").read_text())
        meta["class_names"] = ["cat", "dog", "ship", "truck"]
        (folder / "teacher.json").write_text(json.dumps(meta))
    return folder / "model.safetensors"


def _recipe_file(w: World, name: str, text: str) -> Path:
    path = w.root / "recipes" / name
    path.write_text(text)
    return path


def _broken_export(w: World, what: str) -> Path:
    folder = _copy_run(w, "finished", f"broken_{what}") / "export"
    if what == "config":
        (folder / "config.json").write_text("{ not json")
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    return folder


def _cait_export(w: World) -> Path:
    """A CaiT student's export folder (what `distill train` writes into runs/<name>/export)."""
    import students

    folder = w.root / "cait_export"
    if not folder.exists():
        model = students.create_student("cait_xxs24", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=1,
                                        num_heads=2)
        students.save_student(model, folder, class_names=[f"class_{i}" for i in range(4)])
    return folder


def _softmax_joint_run(w: World) -> Path:
    """A finished run whose student predicts with the softmax average of its heads (student.joint=softmax)."""
    run = _copy_run(w, "finished", "softmax_joint")
    config = run / "export" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "joint": "softmax"}))
    return run


def _truncated_only_checkpoint(w: World) -> list[str]:
    run = _copy_run(w, "stopped", "truncated")
    model = run / "checkpoints" / "last" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    return ["train", str(w.recipe), "train.run_name=truncated", "train.epochs=2", "--resume"]


def _hub_parquet(w: World, extra: bool = False) -> Path:
    """A Hub-layout folder of parquet shards (train and test), plus a file named for no split."""
    folder = w.root / ("hub_parquet_extra" if extra else "hub_parquet")
    if not folder.exists():
        import datasets
        folder.mkdir()
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        names = ["train-00000-of-00001", "test-00000-of-00001"] + (["extra"] if extra else [])
        for i, name in enumerate(names):
            images = [Image.fromarray(np.full((16, 16, 3), 40 * i + k, dtype=np.uint8)) for k in range(8)]
            datasets.Dataset.from_dict({"image": images, "label": [k % 4 for k in range(8)]},
                                       features=features).to_parquet(str(folder / f"{name}.parquet"))
    return folder


def _text_parquet(w: World) -> Path:
    path = w.root / "text.parquet"
    path.write_text("image,label\nnot a parquet file,0\n")
    return path


def _bad_cache(w: World) -> Path:
    folder = w.root / "not_a_cache"
    folder.mkdir(exist_ok=True)
    return folder


T = ["train"]  # shorthand: the recipe goes second
NO_TEACHER = ["distill.kind=none", "teacher.name=null"]


# (id, argv builder, regex the error line must match)
CASES: list[tuple[str, Callable[[World], list[str]], str]] = [
    # --- recipes and overrides ---------------------------------------------------------------
    ("typo_key", lambda w: T + [str(w.recipe), "optim.lrr=1e-3"], r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("key_wrong_section", lambda w: T + [str(w.recipe), "train.lr=1e-3"], r"did you mean 'optim.lr'\?"),
    ("teacher_typo_key", lambda w: ["train-teacher", str(w.recipe), "optim.lrr=1e-3"],
     r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("quickstart_typo_key", lambda w: ["quickstart", "--output-dir", str(w.runs / "quickstart"), "optim.lrr=1e-3"],
     r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("plan_typo_key", lambda w: ["plan", str(w.recipe), "optim.lrr=1e-3"], r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("plan_no_steps", lambda w: ["plan", str(w.recipe), "--steps", "0"], r"plan measures steps >= 1 .*pass --steps"),
    ("wrong_type", lambda w: T + [str(w.recipe), "train.epochs=many"], r"'train.epochs' must be an integer"),
    ("zero_epochs", lambda w: T + [str(w.recipe), "train.epochs=0"], r"'train.epochs' must be >= 1, got 0"),
    ("negative_epochs", lambda w: T + [str(w.recipe), "train.epochs=-3"], r"'train.epochs' must be >= 1"),
    ("stop_after_zero", lambda w: T + [str(w.recipe), "train.stop_after=0"], r"'train.stop_after' must be >= 1"),
    ("max_steps_zero", lambda w: T + [str(w.recipe), "train.max_steps_per_epoch=0"], r"'train.max_steps_per_epoch' must be >= 1"),
    ("save_every_zero", lambda w: T + [str(w.recipe), "train.save_every=0"], r"'train.save_every' must be >= 1"),
    ("eval_every_zero", lambda w: T + [str(w.recipe), "train.eval_every=0"], r"'train.eval_every' must be >= 1"),
    ("grad_accum_zero", lambda w: T + [str(w.recipe), "train.grad_accum_steps=0"], r"'train.grad_accum_steps' must be >= 1"),
    ("alpha_above_one", lambda w: T + [str(w.recipe), "distill.alpha=1.5"], r"'distill.alpha' must be >= 0 and <= 1"),
    ("kind_typo", lambda w: T + [str(w.recipe), "distill.kind=sof"], r"did you mean 'soft'\?"),
    ("odd_batch_with_mixup", lambda w: T + [str(w.recipe), "train.batch_size=7"], r"train.batch_size=7 is odd.*data.mixup=0"),
    ("recipe_name_typo", lambda w: T + ["cifar10_deit_tiyn"], r"unknown recipe 'cifar10_deit_tiyn'; did you mean 'cifar10_deit_tiny'\?"),
    ("recipe_bad_yaml", lambda w: T + [str(_recipe_file(w, "bad.yaml", "data: [unclosed\n"))], r"is not valid YAML"),
    ("recipe_section_typo", lambda w: T + [str(_recipe_file(w, "typo.yaml", "studnet: {name: deit_tiny}\n"))],
     r"unknown key 'studnet'; did you mean 'student'\?"),
    ("recipe_missing_base", lambda w: T + [str(_recipe_file(w, "child.yaml", "base: ./missing.yaml\n"))],
     r"recipe file .*recipes/missing.yaml does not exist"),
    ("override_python_tag", lambda w: T + [str(w.recipe), f'train.run_name=!!python/object/apply:os.system ["touch {w.root / "marker"}"]'],
     r"override 'train.run_name=!!python.*' is not valid YAML: could not determine a constructor for the tag"),
    # --- data ----------------------------------------------------------------------------------
    ("missing_label_column", lambda w: T + [str(w.recipe), "data.label_column=target"],
     r"no label column 'target' .*set data.label_column=<label_column>"),
    ("missing_path", lambda w: T + [str(w.recipe), f"data.source={w.root / 'nowhere'}"], r"path does not exist"),
    ("hub_offline", lambda w: T + [str(w.recipe), "data.source=nobody/no-such-dataset"],
     r"could not be loaded from the Hugging Face Hub .*set data.source=<source>"),
    ("no_such_split", lambda w: T + [str(w.recipe), "data.val_split=dev"], r"no split named 'dev'.*set data.val_split=<val_split>"),
    ("too_many_per_class", lambda w: T + [str(w.recipe), "data.train_per_class=13"],
     r"train_per_class=13 but class 'class_0' has only 12 rows in split 'train'; lower data.train_per_class=<train_per_class>"),
    ("single_class_folder", lambda w: T + [str(w.recipe), f"data.source={_folder(w, 'one_class', {'train': 6, 'val': 2}, classes=1)}"],
     r"holds images without labels: an image folder needs one sub-folder per class, at least 2"),
    ("single_class_table", lambda w: T + [str(w.recipe), f"data.source={_single_class_parquet(w)}"],
     r"holds a single class \('0' in 'label'\); a classifier needs at least 2"),
    ("parquet_glob_of_split_and_unnamed_files", lambda w: T + [str(w.recipe), f"data.source={_hub_parquet(w, extra=True)}/*.parquet"],
     r"test-00000-of-00001.parquet is named for split 'test' but .*extra.parquet for none.*set data.source=<source>"),
    ("parquet_test_file_as_source", lambda w: T + [str(w.recipe), f"data.source={_hub_parquet(w)}/test-00000-of-00001.parquet"],
     r"no split named 'train' \(splits: test\); set data.train_split=<train_split>"),
    ("parquet_that_is_text", lambda w: T + [str(w.recipe), f"data.source={_text_parquet(w)}"],
     r"text.parquet: could not be read as parquet \(ArrowInvalid: .*\); check the file\(s\)$"),
    ("empty_folder", lambda w: T + [str(w.recipe), f"data.source={(w.root / 'empty').mkdir(exist_ok=True) or w.root / 'empty'}"],
     r"folder holds no images"),
    ("corrupt_image_workers_in_memory", lambda w: T + [str(w.recipe), f"data.source={_corrupt_folder(w)}", "data.num_workers=2",
                                                       *NO_TEACHER],
     r"split 'train' row \d+ \(.*3.png\): image could not be decoded"),
    ("corrupt_image_workers_lazy", lambda w: T + [str(w.recipe), f"data.source={_corrupt_folder(w)}", "data.num_workers=2",
                                                  "data.in_memory=false", "train.run_name=lazy", *NO_TEACHER],
     r"split 'train' row \d+ \(.*3.png\): image could not be decoded"),
    # --- teachers and students -------------------------------------------------------------------
    ("teacher_without_weights", lambda w: T + [str(w.recipe), "teacher.checkpoint=null", "teacher_train.epochs=0"],
     r"teacher 'resnet20_cifar' has no weights; set teacher.checkpoint=<file>"),
    ("teacher_wrong_classes", lambda w: T + [str(w.recipe), f"teacher.checkpoint={_wrong_class_teacher(w)}"],
     r"7-class classifier but 4 classes were requested; fine-tune the teacher"),
    ("teacher_missing_file", lambda w: T + [str(w.recipe), f"teacher.checkpoint={w.root / 'nope.safetensors'}"], r"does not exist"),
    ("teacher_of_other_classes", lambda w: T + [str(w.recipe), f"teacher.checkpoint={_other_classes_teacher(w)}"],
     r"fine-tuned on other classes .*\('cat' vs 'class_0'\)"),
    ("teacher_of_other_dataset", lambda w: T + [str(w.recipe), f"data.source={shutil.copytree(w.data, w.root / 'copy', dirs_exist_ok=True)}"],
     r"was fine-tuned on .*, but data.source is"),
    ("teacher_needs_unpickling", lambda w: T + [str(w.recipe), f"teacher.checkpoint={_pickled_teacher(w)}"],
     r"needs arbitrary unpickling, which can run code, so it is refused"),
    ("teacher_export_of_another_name", lambda w: T + [str(w.recipe), "teacher.name=resnet56_cifar"],
     r"holds a 'resnet20_cifar' teacher but teacher.name is 'resnet56_cifar'; set teacher.name=resnet20_cifar"),
    ("teacher_name_typo", lambda w: T + [str(w.recipe), "teacher.name=resnet20_cifra", "teacher.checkpoint=null"],
     r"unknown teacher 'resnet20_cifra'; did you mean 'resnet20_cifar'\?"),
    ("teacher_bad_kwarg", lambda w: T + [str(w.recipe), "teacher.kwargs={wings: 2}"],
     r"teacher 'resnet20_cifar' does not take 'wings' \(teacher.kwargs\); it takes: .*drop_rate"),
    ("teacher_pretrained_offline", lambda w: T + [str(w.recipe), "teacher.name=resnet18", "teacher.checkpoint=null",
                                                  "teacher.pretrained=true", "teacher_train.epochs=0"],
     r"could not get the pretrained weights of teacher 'resnet18' .*connect, or pass a local weights file with "
     r"teacher.checkpoint=<file>"),
    ("student_name_typo", lambda w: T + [str(w.recipe), "student.name=deit_tinny"], r"unknown student 'deit_tinny'; did you mean 'deit_tiny'\?"),
    ("student_bad_kwarg", lambda w: T + [str(w.recipe), "student.kwargs={wings: 2}"], r"does not take 'wings'"),
    ("student_checkpoint_of_another_family", lambda w: T + [str(w.recipe), f"student.checkpoint={_cait_export(w)}"],
     r"does not fit DeiT: it holds a CaiT \(cait_xxs24\) checkpoint and the student is a DeiT \(deit_tiny\); "
     r"point student.checkpoint at a DeiT checkpoint, or set student.name=cait_xxs24"),
    # --- run folders and checkpoints ---------------------------------------------------------------
    ("finished_run_again", lambda w: T + [str(w.recipe), "train.run_name=finished"], r"already holds a run .*--resume"),
    ("metrics_without_checkpoint", lambda w: T + [str(w.recipe), "train.run_name=" + _metrics_only(w)],
     r"already holds a run \(metrics.jsonl\)"),
    ("resume_nothing", lambda w: T + [str(w.recipe), "train.run_name=never", "--resume"], r"no complete checkpoint under"),
    ("resume_finished", lambda w: T + [str(w.recipe), "train.run_name=finished", "--resume"], r"has finished all 1 epochs; raise train.epochs"),
    ("output_dir_is_a_file", lambda w: T + [str(w.recipe), f"train.output_dir={w.recipe}"], r"is a file; set train.output_dir="),
    ("resume_other_architecture", lambda w: T + [str(w.recipe), "train.run_name=stopped", "train.epochs=2", "--resume",
                                                 "student.kwargs={embed_dim: 32, depth: 3, num_heads: 2}"],
     r"holds another model \(depth: 2 there, 3 in this recipe\)"),
    ("resume_truncated_checkpoint", _truncated_only_checkpoint, r"model.safetensors is damaged .*no intact checkpoint is left"),
    ("resume_more_processes_than_saved", lambda w: T + [str(w.recipe), "train.run_name=" + _two_process_checkpoint(w), "train.epochs=2", "--resume"],
     r"written by 2 process\(es\) but this run has 1"),
    ("resume_with_garbage_in_metrics", lambda w: T + [str(w.recipe), "train.run_name=" + _garbage_metrics(w), "train.epochs=2",
                                                      "--resume"],
     r"metrics.jsonl line 2 is not a metrics record .*delete that line"),
    # --- eval -------------------------------------------------------------------------------------------
    ("eval_stopped_run", lambda w: ["eval", str(w.stopped)], r"has no export yet: the run stopped after epoch 1; .*--resume"),
    ("eval_broken_config", lambda w: ["eval", str(_broken_export(w, "config"))], r"config.json is damaged"),
    ("eval_truncated_weights", lambda w: ["eval", str(_broken_export(w, "weights"))], r"model.safetensors is damaged or truncated"),
    ("eval_missing_data", lambda w: ["eval", str(w.finished), "--data", str(w.root / "nowhere")], r"path does not exist"),
    ("eval_no_such_split", lambda w: ["eval", str(w.finished), "--split", "dev"], r"no split named 'dev'.*set --split <split>"),
    ("eval_other_classes", lambda w: ["eval", str(w.finished), "--data", str(_folder(w, "three", {"test": 3}, classes=3))],
     r"the student predicts 4 classes .* labels 3"),
    ("eval_not_a_run", lambda w: ["eval", str(w.root / "recipes")], r"neither a run folder nor an exported student"),
    ("eval_wrong_typed_config_field", lambda w: ["eval", str(_retyped_export(w))],
     r"config.json is damaged: field 'student.img_size' is '16', not an integer"),
    ("eval_no_teacher_export_other_class_count", lambda w: ["eval", str(w.finished / "export"), "--data", str(_three_class_ids(w))],
     r"the student predicts 4 classes .* labels 3"),
    ("analyze_out_is_a_file", lambda w: ["analyze", str(w.finished), "--out", str(w.recipe)], r"r.yaml is a file; pass a folder as --out"),
    # --- export ---------------------------------------------------------------------------------------
    ("export_softmax_joint_student", lambda w: ["export", str(_softmax_joint_run(w)), "--format", "timm"],
     r"predicts with the average of its two heads' softmax outputs \(student.joint=softmax\).*"
     r"export one head with --head cls or --head dist"),
    # --- predict, export --format onnx, report ------------------------------------------------------
    ("predict_missing_image", lambda w: ["predict", str(w.finished), str(w.root / "nowhere.png")], r"nowhere.png does not exist"),
    ("predict_not_an_image", lambda w: ["predict", str(w.finished), str(w.recipe)], r"r.yaml is not an image that can be read"),
    ("predict_stopped_run", lambda w: ["predict", str(w.stopped), str(_an_image(w))], r"has not finished .*--resume"),
    ("predict_not_a_run", lambda w: ["predict", str(w.root / "recipes"), str(_an_image(w))],
     r"neither a run folder nor an exported student"),
    ("predict_teacher_export", lambda w: ["predict", str(w.teacher.parent), str(_an_image(w))], r"is a fine-tuned teacher, not a student .*export the student's run folder"),
    ("predict_split_of_files", lambda w: ["predict", str(w.finished), str(_an_image(w)), "--split", "val"],
     r"--split applies to a dataset"),
    ("predict_top_k_zero", lambda w: ["predict", str(w.finished), str(_an_image(w)), "--top-k", "0"],
     r"--top-k must be a positive integer"),
    ("predict_json_in_missing_folder", lambda w: ["predict", str(w.finished), str(_an_image(w)), "--json", str(w.root / "no" / "p.json")],
     r"--json .*p.json: folder .* does not exist"),
    ("predict_empty_folder", lambda w: ["predict", str(w.finished), str((w.root / "empty").mkdir(exist_ok=True) or w.root / "empty")],
     r"folder holds no images"),
    ("predict_corrupt_image_in_folder", lambda w: ["predict", str(w.finished), str(_corrupt_folder(w) / "train")],
     r"3.png is not an image that can be read"),
    ("export_a_teacher_run", lambda w: ["export", str(_teacher_run(w)), "--format", "timm"],
     r"is a fine-tuned teacher, not a student .*teacher.checkpoint=.*model.safetensors"),
    ("export_onnx_stopped_run", lambda w: ["export", str(w.stopped), "--format", "onnx"], r"has not finished .*--resume"),
    ("report_stopped_run", lambda w: ["report", str(w.stopped), "--no-timing"], r"run .*stopped has not finished .*--resume"),
    ("report_not_a_run", lambda w: ["report", str(w.root / "recipes"), "--no-timing"], r"is not a run folder \(no config.yaml\)"),
    ("report_missing_run", lambda w: ["report", str(w.finished), str(w.runs / "nope"), "--no-timing"], r"nope does not exist"),
    # --- compare -------------------------------------------------------------------------------------------
    ("compare_not_a_run", lambda w: ["compare", str(w.finished), str(w.root / "recipes")], r"recipes is not a run folder \(no metrics.jsonl\)"),
    ("compare_export_folder", lambda w: ["compare", str(w.finished / "export")], r"is an export folder, not a run"),
    ("compare_missing", lambda w: ["compare", str(w.finished), str(w.runs / "never")], r"never does not exist; pass run folders"),
    ("compare_other_dataset", lambda w: ["compare", str(w.finished), str(_run_of_other_data(w))],
     r"was trained on .* but .*other_data on .*elsewhere; compare runs of one dataset"),
    # --- teacher cache ------------------------------------------------------------------------------
    ("cache_not_a_cache", lambda w: T + [str(w.recipe), f"teacher.cache={_bad_cache(w)}"], r"is not a readable teacher cache"),
    ("cache_check_missing", lambda w: ["cache-teacher", str(w.recipe), "--check", f"teacher.cache={_bad_cache(w)}"],
     r"is not a readable teacher cache"),
    ("cache_garbage_epoch_train", lambda w: T + [str(w.recipe), f"teacher.cache={_garbage_cache(w)}", "train.run_name=from_garbage"],
     r"epoch_0000/values.npy is damaged \(its size or checksum differs from checksums.json\)"),
    ("cache_garbage_epoch_check", lambda w: ["cache-teacher", str(w.recipe), "--check", f"teacher.cache={_garbage_cache(w)}"],
     r"epoch_0000/values.npy is damaged"),
]


def _garbage_cache(w: World) -> Path:
    """A one-epoch cache of the world's recipe whose stored logits were then overwritten with garbage."""
    root = w.root / "garbage_cache"
    if not root.exists():
        from distill.cache_teacher import build_cache
        from distill.recipes import load_recipe
        build_cache(load_recipe(str(w.recipe), [f"teacher.cache={root}"]))
        values = root / "epoch_0000" / "values.npy"
        array = np.load(values)
        np.save(values, np.random.default_rng(0).normal(size=array.shape).astype(array.dtype) * 100)
    return root


def _retyped_export(w: World) -> Path:
    folder = _copy_run(w, "finished", "retyped") / "export"
    config = json.loads((folder / "config.json").read_text())
    config["student"]["img_size"] = "16"  # a hand edit: a string where the builder takes an integer
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _three_class_ids(w: World) -> Path:
    """A table labelled with plain ids 0..2: a dataset of 3 classes, not the student's 4."""
    path = w.root / "three_ids.parquet"
    if not path.exists():
        import datasets
        images = [Image.fromarray(np.full((16, 16, 3), i * 20, dtype=np.uint8)) for i in range(9)]
        ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(9)]},
                                        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
        ds.to_parquet(str(path))
    return path


def _teacher_run(w: World) -> Path:
    """A teacher stage's run folder, as `distill train-teacher` leaves it: config.yaml and export/."""
    run = w.root / "r-teacher"
    if not run.exists():
        shutil.copytree(w.teacher.parent, run / "export")
        shutil.copy(w.recipe, run / "config.yaml")
    return run


def _an_image(w: World) -> Path:
    return w.data / "val" / "class_0" / "0.png"


def _run_of_other_data(w: World) -> Path:
    run = w.runs / "other_data"
    if not run.exists():
        shutil.copytree(w.finished, run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"]["source"] = str(w.root / "elsewhere")
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _metrics_only(w: World) -> str:
    folder = w.runs / "metrics_only"
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    return "metrics_only"


def _garbage_metrics(w: World) -> str:
    run = _copy_run(w, "stopped", "garbage_metrics")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{this is no json\n")
    return "garbage_metrics"


def _two_process_checkpoint(w: World) -> str:
    run = _copy_run(w, "stopped", "two_process")
    state_file = run / "checkpoints" / "last" / "trainer_state.json"
    state = {**json.loads(state_file.read_text()), "num_processes": 2}
    state_file.write_text(json.dumps({**state, "digest": ckpt.state_digest(state)}))  # as 2 processes write it
    return "two_process"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def command_options(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def assert_hints_exist(message: str, command: str) -> None:
    """Every `section.key=` names a config key; every `--option` belongs to the command it is given
    for (the one run, or a `distill <cmd> ...` quoted in the message); no Python keyword hints."""
    keys = set(all_keys(Config()))
    for key in re.findall(r"(?<![\w./-])([a-z_]+\.[a-z_]+)=", message):
        assert key in keys, f"hint names {key!r}, which is no config key: {message}"
    quoted = re.findall(r"`distill ([a-z-]+)([^`]*)`", message)
    # A busy folder's holder is quoted with its own command line, "(pid N: <command>)": that command is
    # the other process's (here the test runner's), not a hint to this one.
    outside = re.sub(r"`[^`]*`|\(pid \d+: [^)]*\)", "", message)
    for cmd, text in quoted:
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text):
            assert option in command_options(cmd), f"`distill {cmd}` has no {option}: {message}"
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", outside):
        assert option in command_options(command), f"`distill {command}` has no {option}: {message}"
    bare = re.findall(r"(?:set|pass) (?!data\.|train\.|teacher\.|student\.|optim\.|distill\.|--)([a-z_]+)=", message)
    assert not bare, f"hint names a Python keyword ({bare}): {message}"


def case_commands() -> list[str]:
    """The command each case runs, read off the catalogue's source (running a case's argv builds its
    files): ``T + [...]``, a list whose first word is the command, or a helper returning one."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    helpers = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    catalogue = next(node for node in tree.body if isinstance(node, ast.AnnAssign) and node.target.id == "CASES")
    commands = []
    for case in catalogue.value.elts:
        argv = case.elts[1]
        if isinstance(argv, ast.Name):
            argv = next(node for node in ast.walk(helpers[argv.id]) if isinstance(node, ast.Return)).value
        else:
            argv = argv.body
        if isinstance(argv, ast.BinOp):
            argv = argv.left
        commands.append(globals()[argv.id][0] if isinstance(argv, ast.Name) else argv.elts[0].value)
    return commands


def test_the_catalogue_covers_every_command_that_reads_input():
    names = [case[0] for case in CASES]
    assert len(set(names)) == len(names), "two cases share an id"
    commands = case_commands()
    assert len(commands) == len(CASES) and set(commands) <= set(COMMANDS)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    reads_input = {name for name, sub in subparsers.items()
                   if any(not isinstance(a, argparse._HelpAction) for a in sub._actions)}
    assert reads_input >= {"train", "eval", "predict"}  # the parser was read right
    assert not reads_input - set(commands), f"no bad-input case for `distill {sorted(reads_input - set(commands))}`"
    for name, _, pattern in CASES:  # each case checks its own message, not just "an error"
        assert pattern.strip() and not re.search(pattern, "error: "), name


@pytest.mark.parametrize("name, argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capfd, name, argv, pattern):
    args = argv(world)
    before = snapshot(world.runs)
    capfd.readouterr()
    code = cli(args)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code != 0, f"exit 0 for {args}\nstdout: {out[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err[-3000:]}"
    assert re.search(pattern, lines[0]), lines[0]
    assert_hints_exist(lines[0], args[0])
    after = snapshot(world.runs)
    changed = [f for f in before if after.get(f) != before[f]]
    assert not changed, f"{name} changed {changed}"
    assert not list(world.runs.rglob("*.tmp")), "a temporary folder was left behind"


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from distill.images import ImageClassificationDataset
    from distill.splits import load_image_dataset

    for c, top in enumerate((65535, 30000)):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        ramp = np.linspace(0, top, 16 * 16).astype(np.uint16).reshape(16, 16)
        Image.fromarray(ramp).save(d / "0.png")  # a 16-bit greyscale PNG
        Image.fromarray(ramp).save(d / "1.png")
    splits = load_image_dataset(tmp_path, val_fraction=0.25)
    ds = ImageClassificationDataset(splits.train)
    for i in range(len(ds)):
        pixels = ds.image(i)
        assert pixels.mode == "RGB"
        grey = np.asarray(pixels)[..., 0].astype(int)
        assert len(np.unique(grey)) > 100  # a ramp, not a few clipped levels
        assert grey.max() in (255, round(30000 * 255 / 65535))
    with Image.open(tmp_path / "train" / "c0" / "0.png") as img:
        assert img.mode.startswith("I")  # the file really is 16-bit


def test_relative_base_resolves_against_the_recipe_folder(tmp_path, monkeypatch):
    from distill.recipes import load_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "parent.yaml").write_text("optim: {lr: 0.123}\n")
    (tmp_path / "recipes" / "child.yaml").write_text("base: parent.yaml\ntrain: {epochs: 7}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "parent.yaml").write_text("optim: {lr: 0.999}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_recipe(str(tmp_path / "recipes" / "child.yaml"))
    assert cfg.optim.lr == 0.123 and cfg.train.epochs == 7
    (tmp_path / "recipes" / "nested.yaml").write_text("base: ../recipes/child.yaml\n")
    assert load_recipe(str(tmp_path / "recipes" / "nested.yaml")).optim.lr == 0.123
    (tmp_path / "recipes" / "builtin.yaml").write_text("base: quickstart\n")
    assert load_recipe(str(tmp_path / "recipes" / "builtin.yaml")).data.source == "digits"


def test_python_tag_runs_nothing_and_reads_as_in_a_recipe_file(tmp_path, tiny_recipe, capfd):
    """`yaml.safe_load` never builds the object; the override's error is the recipe file's line."""
    marker = tmp_path / "marker"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"train: {{run_name: {tag}}}\n")
    lines = []
    for argv in (["train", str(tiny_recipe), f"train.run_name={tag}"], ["train", str(tagged)]):
        capfd.readouterr()
        assert cli(argv) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        lines.append(err[0])
    assert not marker.exists()
    why = "is not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"
    assert lines[0].startswith(f"error: override 'train.run_name={tag}' {why}")
    assert lines[1].startswith(f"error: {tagged} {why}")


def _cli_in_subprocess(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`distill <args>` in a fresh interpreter, whose stderr holds what the libraries' own log
    handlers write (in-process, pytest's capture does not see them). Retries do not wait."""
    from conftest import REPO

    code = "import sys, time; time.sleep = lambda s: None; from distill.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)


def test_unreadable_parquet_is_one_line(tmp_path, tiny_recipe):
    """datasets logs its parquet reader's failure before raising; only the error line may show."""
    text = tmp_path / "text.parquet"
    text.write_text("image,label\nnot a parquet file,0\n")
    result = _cli_in_subprocess(["train", str(tiny_recipe), f"data.source={text}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert re.match(r"error: .*text.parquet: could not be read as parquet \(ArrowInvalid: .*\); check the file\(s\)$",
                    result.stderr.strip())


def test_unreachable_hub_is_one_line(tmp_path, tiny_recipe):
    """No network (and no offline flag): huggingface_hub logs every retry; none of it may surround the
    error line. The Hub is a local port that refuses connections."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        result = _cli_in_subprocess(["train", str(tiny_recipe), "data.source=nobody/no-such-dataset"],
                                    HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                                    HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert re.match(r"error: 'nobody/no-such-dataset' could not be loaded from the Hugging Face Hub \(.*\); "
                    r"set data.source=<source> to a local folder or parquet file$", result.stderr.strip())


# --- two writers, one folder: the second is refused while the first holds the folder's lock ----------
# (tests/test_lock.py starts two real processes; here the test itself holds the lock, so the moment is
# certain, and every writer is checked for one line naming the holder)
BUSY = [
    ("train", lambda w: T + [str(w.recipe), "train.run_name=busy"], lambda w: w.runs / "busy",
     r"run folder .*busy is being written by another process \(pid \d+: .*\); wait for it to finish, or set "
     r"train.run_name=<new name> to start another run$"),
    ("train_resume", lambda w: T + [str(w.recipe), "train.run_name=stopped", "--resume"], lambda w: w.stopped,
     r"run folder .*stopped is being written by another process \(pid \d+"),
    ("train_teacher", lambda w: ["train-teacher", str(w.recipe), "train.run_name=busy"], lambda w: w.runs / "busy-teacher",
     r"run folder .*busy-teacher is being written by another process \(pid \d+"),
    ("cache_teacher", lambda w: ["cache-teacher", str(w.recipe), "train.run_name=busy"],
     lambda w: w.runs / "busy-teacher-cache",
     r"teacher cache .*busy-teacher-cache is being written by another process \(pid \d+: .*\); wait for it to "
     r"finish, or set teacher.cache=<another folder>$"),
    ("export", lambda w: ["export", str(w.finished), "--format", "timm"], lambda w: w.finished / "export_timm",
     r"export folder .*export_timm is being written by another process \(pid \d+: .*\); wait for it to finish, "
     r"or pass another --out$"),
]


@pytest.mark.parametrize("argv, folder, pattern", [b[1:] for b in BUSY], ids=[b[0] for b in BUSY])
def test_a_folder_another_process_writes_is_refused_in_one_line(world, capfd, argv, folder, pattern):
    from distill import lock

    args, target = argv(world), folder(world)
    existed = target.exists()
    before = snapshot(world.runs)
    with lock.hold(target, "held by the test"):  # flock: a second open file of the same process conflicts too
        capfd.readouterr()
        code = cli(args)
        lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]) and f"pid {os.getpid()}" in lines[0], lines[0]
    assert_hints_exist(lines[0], args[0])
    assert snapshot(world.runs) == before and target.exists() == existed
    assert not lock.lock_file(target).exists()  # released and removed with the test's hold


def test_pretrained_teacher_with_an_unreachable_hub_is_one_line_without_retries(tmp_path, tiny_recipe):
    """teacher.pretrained=true, no network (and no offline flag): huggingface_hub would retry each
    file's request 5 times and log every retry (22 lines before the error); one connection attempt
    finds the Hub unreachable, the download runs offline (an empty cache here), one line says why."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        result = _cli_in_subprocess(["train-teacher", str(tiny_recipe), "teacher.name=resnet18", "teacher.pretrained=true"],
                                    HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}",
                                    HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Retry" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert re.match(r"error: could not get the pretrained weights of teacher 'resnet18' \(the Hugging Face Hub at "
                    r"http://127.0.0.1:\d+ cannot be reached and they are not in the local cache\); this needs the "
                    r"network: connect, or pass a local weights file with teacher.checkpoint=<file>$", result.stderr.strip())
    assert not (tmp_path / "runs").exists()


def test_a_teacher_checkpoint_with_pretrained_true_says_which_is_used(world, capfd):
    """The checkpoint wins (a built-in recipe sets teacher.pretrained=true): one warning line, and the
    resolved config shows what is used."""
    capfd.readouterr()
    with pytest.warns(UserWarning) as warned:  # pytest takes the warnings; the CLI prints each as one line
        assert cli(T + [str(world.recipe), "teacher.pretrained=true", "--print-config"]) == 0
    out, err = capfd.readouterr()
    checkpoint = yaml.safe_load(world.recipe.read_text())["teacher"]["checkpoint"]
    assert [str(w.message) for w in warned] == [
        f"teacher.checkpoint={checkpoint} is used and teacher.pretrained=true is ignored (nothing is "
        "downloaded); the resolved config has teacher.pretrained=false"] and not err
    resolved = yaml.safe_load(out)["teacher"]
    assert resolved["pretrained"] is False and resolved["checkpoint"] is not None


@pytest.mark.parametrize("epochs, change", [(1, "was for 2 epochs and now ends at epoch 1, cut short"),
                                            (3, "is stretched from 2 to 3 epochs")])
def test_resuming_with_another_number_of_epochs_says_the_schedule_changed(world, epochs, change):
    """The stopped run was started for 2 epochs (1 done); resuming with 1 finishes it at once with a
    schedule cut short, with 3 stretches the cosine: one warning line either way, and the run goes on."""
    run = _copy_run(world, "stopped", f"schedule_{epochs}")
    result = _cli_in_subprocess(T + [str(world.recipe), f"train.run_name={run.name}", f"train.epochs={epochs}", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"warning: {run} was started with 2 epochs and resumes after epoch 1 with train.epochs={epochs}: its cosine "
        f"learning-rate schedule {change} (the learning rate jumps onto the new curve); set train.epochs=2 to finish "
        "it as started"]
    assert (run / "export" / "model.safetensors").is_file()


def test_resuming_with_other_optimiser_groups_is_one_line(world, capfd):
    """optim.norm_lr_scale puts the normalisation layers in a group of their own: a checkpoint written
    without it cannot be resumed with it, and nothing of the run is touched."""
    run = _copy_run(world, "stopped", "other_groups")
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    capfd.readouterr()
    assert cli(T + [str(world.recipe), f"train.run_name={run.name}", "train.epochs=2", "optim.norm_lr_scale=64", "--resume"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'checkpoints'}") and \
        "holds the optimiser state of other settings (loaded state dict has a different number of parameter groups); " \
        "resume with the optimiser settings that wrote it" in err[0], err
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before


def test_a_linear_schedule_also_warns_when_the_run_length_changes(tmp_path):
    from distill import rundir

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 4}, "optim": {"sched": "linear"}}))
    with pytest.warns(UserWarning, match=r"its linear learning-rate schedule is stretched from 4 to 6 epochs"):
        rundir.warn_schedule_change(tmp_path, 6, 2)


def test_resuming_with_the_same_number_of_epochs_says_nothing(world):
    from distill import rundir
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rundir.warn_schedule_change(world.stopped, 2, 1)
    with pytest.warns(UserWarning, match="stretched from 2 to 5 epochs"):
        rundir.warn_schedule_change(world.stopped, 5, 1)
