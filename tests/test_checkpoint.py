"""Checkpoints: nothing read runs code, damaged files are detected, and a resume lands exactly."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill import checkpoint as ckpt
from distill.checkpoint import CheckpointError
from distill.recipes import dump as ckpt_dump
from distill.loop import train

from conftest import REPO, make_config, read_metrics, tiny_config


class Payload:
    """Unpickling this creates ``path``: a stand-in for any code a crafted file could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_payload(file, marker) -> None:
    with open(file, "wb") as f:
        pickle.dump(Payload(str(marker)), f, protocol=2)


def reseal(folder) -> None:
    """Rewrite the manifest for the files as they are now, as anyone handing over a folder could."""
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    state["files"] = {f.name: ckpt.describe_file(f) for f in sorted(folder.iterdir()) if f.name != ckpt.STATE_FILE}
    (folder / ckpt.STATE_FILE).write_text(json.dumps({**state, "digest": ckpt.state_digest(state)}))


@pytest.fixture
def stopped_run(tiny_dataset, tmp_path, trained_teacher):
    """A 3-epoch run (with EMA) stopped after 2 epochs: checkpoints `last` (2) and `previous` (1)."""
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)},
                      train={"epochs": 3, "stop_after": 2, "ema": True, "ema_decay": 0.9})
    train(cfg)
    cfg.train.stop_after = None
    return cfg, tmp_path / "tiny"


def test_checkpoint_holds_only_tensors_and_numbers(stopped_run):
    _, run = stopped_run
    last = run / "checkpoints" / "last"
    names = sorted(p.name for p in last.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng_state_0.pt", "trainer_state.json"]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and json.loads((run / "checkpoints" / "previous" / "trainer_state.json").read_text())["epoch"] == 1
    assert state["model"]["name"] == "deit_tiny" and state["num_processes"] == 1
    for name in ("optimizer.pt", "rng_state_0.pt"):
        torch.load(last / name, weights_only=True)  # loadable without unpickling code
    assert not list(last.glob("*.pkl")) and not list(last.glob("*.bin"))


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng_state_0.pt"])
def test_a_crafted_file_is_refused_and_runs_nothing(stopped_run, tmp_path, victim):
    cfg, run = stopped_run
    marker = tmp_path / "pwned"
    for folder in (run / "checkpoints" / "last", run / "checkpoints" / "previous"):
        write_payload(folder / victim, marker)
        reseal(folder)
    with pytest.raises(CheckpointError, match="arbitrary unpickling, which can run code, so it is refused"):
        train(cfg, resume=True)
    assert not marker.exists()


def test_an_accelerate_save_state_folder_is_refused(stopped_run, tmp_path):
    """Accelerate's own layout unpickles the EMA (custom_checkpoint_0.pkl) with weights_only=False."""
    cfg, run = stopped_run
    handed = tmp_path / "handed_over"
    handed.mkdir()
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        write_payload(handed / name, marker)
    shutil.copy(run / "checkpoints" / "last" / "model.safetensors", handed)
    (handed / "trainer_state.json").write_text(json.dumps({"epoch": 1, "global_step": 6}))
    cfg.train.run_name = "from_handed"
    with pytest.raises(CheckpointError, match="Accelerate's save_state format.*refused"):
        train(cfg, resume=handed)
    assert not marker.exists()


def test_damaged_last_checkpoint_falls_back_to_previous_exactly(stopped_run, tiny_dataset, tmp_path, trained_teacher):
    cfg, run = stopped_run
    optimizer = run / "checkpoints" / "last" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated, as by a crash of the disk
    with pytest.warns(UserWarning, match=r"optimizer\.pt is damaged.*resuming from the previous checkpoint"):
        train(cfg, resume=True)
    assert [h["epoch"] for h in read_metrics(run)] == [1, 2, 3]
    full = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)},
                       train={"epochs": 3, "ema": True, "ema_decay": 0.9, "run_name": "full"})
    train(full)
    a, b = (load_file(str(r / "export" / "model.safetensors")) for r in (tmp_path / "full", run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_fallback_warning_is_one_line_once_on_the_command_line(stopped_run, tmp_path):
    cfg, run = stopped_run
    optimizer = run / "checkpoints" / "last" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    recipe = tmp_path / "stopped.yaml"
    recipe.write_text(ckpt_dump(cfg))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "distill", "train", str(recipe), "--resume"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "resuming from the previous checkpoint" in lines[0], lines


def test_an_edited_trainer_state_is_detected_and_previous_is_used(stopped_run):
    """The manifest protects the other files and its own digest protects it: a hand-edited epoch in
    `last` is found, and the run resumes from `previous` (epoch 1), redoing epochs 2 and 3."""
    cfg, run = stopped_run
    state_file = run / "checkpoints" / "last" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"epoch": 2', '"epoch": 1'))
    with pytest.warns(UserWarning, match=r"trainer_state\.json was edited or is damaged.*previous checkpoint .*epoch 1"):
        train(cfg, resume=True)
    assert [h["epoch"] for h in read_metrics(run)] == [1, 2, 3]


def test_a_checkpoint_of_the_earlier_format_is_refused_with_its_own_message(stopped_run):
    cfg, run = stopped_run
    for folder in (run / "checkpoints" / "last", run / "checkpoints" / "previous"):
        state = json.loads((folder / "trainer_state.json").read_text())
        del state["digest"]
        (folder / "trainer_state.json").write_text(json.dumps({**state, "format": 2}))
    with pytest.raises(CheckpointError, match="earlier deit-distill .checkpoint format 2.; resume it with that version"):
        train(cfg, resume=True)


def test_a_failed_torch_save_under_a_file_size_limit_says_so(tmp_path):
    """torch's zip writer reports a short write as "unexpected pos" without an errno; the state is
    serialised in memory and written by Python, whose error names the limit."""
    import resource
    import signal

    code = ("import sys, torch; from pathlib import Path; from distill import atomic, checkpoint as c\n"
            "try:\n    c._save_torch({'w': torch.zeros(100_000)}, Path(sys.argv[1]))\n"
            "except Exception as e:\n    print(atomic.write_error(e, Path(sys.argv[1]).parent)[0])")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.pt")], cwd=REPO, capture_output=True,
                            text=True, timeout=120, preexec_fn=limit)
    assert result.stdout.strip() == "a file grew past the file-size limit", result.stdout + result.stderr[-2000:]


def test_damaged_only_checkpoint_names_the_file(tiny_dataset, tmp_path, trained_teacher):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, train={"stop_after": 1})
    train(cfg)
    model = tmp_path / "tiny" / "checkpoints" / "last" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged .*no intact checkpoint is left"):
        train(cfg, resume=True)


def test_resume_into_another_architecture_says_what_differs(stopped_run):
    cfg, _ = stopped_run
    cfg.student.kwargs["depth"] = 3
    with pytest.raises(CheckpointError, match=r"holds another model \(depth: 2 there, 3 in this recipe\)"):
        train(cfg, resume=True)


def test_resume_with_another_process_count_is_refused(stopped_run):
    cfg, run = stopped_run
    for folder in (run / "checkpoints" / "last", run / "checkpoints" / "previous"):
        state = {**json.loads((folder / "trainer_state.json").read_text()), "num_processes": 2}
        # As a 2-process run writes it (its digest matches): what is refused is the process count.
        (folder / "trainer_state.json").write_text(json.dumps({**state, "digest": ckpt.state_digest(state)}))
    with pytest.raises(CheckpointError, match="written by 2 process.*same number of processes"):
        train(cfg, resume=True)


def test_disk_full_during_a_save_leaves_no_temporary_folder(tiny_dataset, tmp_path, trained_teacher, monkeypatch):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, train={"epochs": 3})
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 saves optimizer + RNG; the optimizer of epoch 2 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left on the device while saving the checkpoint of epoch 2 .* "
                                              r"the checkpoint of epoch 1 is intact; free some space"):
        train(cfg)
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]
    assert [h["epoch"] for h in read_metrics(tmp_path / "tiny")] == [1]  # the log never runs ahead


@pytest.mark.slow
def test_file_size_limit_during_a_save_is_one_line(tiny_dataset, tmp_path, trained_teacher):
    """A real OS write failure (RLIMIT_FSIZE) in a real CLI run: one line, exit 2, no last.tmp."""
    import resource
    import signal

    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"]["checkpoint"] = str(trained_teacher)
    raw["data"]["num_workers"] = 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    model_bytes = os.path.getsize(trained_teacher)  # ~1 MB; the student's optimizer state is far smaller

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    assert model_bytes > 60_000
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "distill", "train", str(recipe)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, preexec_fn=limit)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: ") and "file-size limit" in err[0], err
    assert not (tmp_path / "runs" / "r" / "checkpoints" / "last.tmp").exists()
