"""One writer per folder (distill/lock.py): the lock itself, then two real processes into one folder.

The moment the second process starts is made certain, not waited for: the first process writes its
pid into the lock file once it holds the lock, the test sees it there and stops the first process
(SIGSTOP) while it holds the lock, starts the second, and lets the first go on (SIGCONT).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill import lock
from conftest import REPO, read_metrics, tiny_config

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_a_second_holder_is_refused_and_the_lock_is_removed_after_use(tmp_path):
    folder = tmp_path / "new" / "runs" / "r"
    with lock.hold(folder, "run folder", "do something else"):
        assert lock.lock_file(folder).read_text().startswith(f"{os.getpid()} ")
        with pytest.raises(lock.FolderBusyError, match=rf"^run folder {folder} is being written by another process "
                                                       rf"\(pid {os.getpid()}: .*\); do something else$"):
            with lock.hold(folder, "run folder", "do something else"):
                pass
    assert not (tmp_path / "new").exists()  # the folders made for the lock file were empty: removed
    with lock.hold(folder):  # free again
        folder.mkdir()
    assert folder.is_dir() and not lock.lock_file(folder).exists()


def test_only_the_main_process_of_a_multi_process_run_takes_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    with lock.hold(folder):
        monkeypatch.setenv("RANK", "1")
        with lock.hold(folder):  # another rank of the same run: no lock of its own
            pass


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    """What SIGKILL leaves: the file, with a pid, but no lock (the kernel released it)."""
    folder = tmp_path / "r"
    lock.lock_file(folder).write_text("999999 distill train r.yaml\n")
    with lock.hold(folder):
        assert lock.lock_file(folder).read_text().startswith(f"{os.getpid()} ")


# ------------------------------------------------------------------------------------------------
# Two real processes

def _recipe(tmp_path: Path, dataset: Path, teacher: Path | None, **train) -> Path:
    raw = tiny_config(dataset, tmp_path / "runs")
    if teacher is not None:
        raw["teacher"]["checkpoint"] = str(teacher)
    raw["teacher_train"]["epochs"] = 2
    raw["train"].update(train)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_until_it_holds(proc: subprocess.Popen, folder: Path) -> None:
    """Until ``proc`` has written its pid into ``folder``'s lock file (it holds the lock then)."""
    path, deadline = lock.lock_file(folder), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if path.read_text().startswith(f"{proc.pid} "):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"{proc.args} never held {path}: {err[-2000:]}")


def _second_is_refused_while_first_holds(args: list[str], folder: Path, what: str) -> subprocess.Popen:
    """Start ``args`` twice; the second runs while the first holds ``folder`` (stopped there); returns
    the first, running again."""
    first = _start(args)
    _wait_until_it_holds(first, folder)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith(f"error: {what} {folder} is being written by another process (pid {first.pid}: "
                               f"distill {args[0]} "), lines[0]
    return first


@pytest.mark.slow
def test_two_trainings_into_one_run_folder(tiny_dataset, tmp_path, trained_teacher):
    recipe = _recipe(tmp_path, tiny_dataset, trained_teacher, epochs=3)
    run = tmp_path / "runs" / "r"
    first = _second_is_refused_while_first_holds(["train", str(recipe)], run, "run folder")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]  # one line per epoch, in order
    assert (run / "export" / "model.safetensors").is_file() and not lock.lock_file(run).exists()


@pytest.mark.slow
def test_two_teacher_trainings_into_one_teacher_folder(tiny_dataset, tmp_path):
    recipe = _recipe(tmp_path, tiny_dataset, None)
    run = tmp_path / "runs" / "r-teacher"
    first = _second_is_refused_while_first_holds(["train-teacher", str(recipe)], run, "run folder")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert (run / "export" / "teacher.json").is_file()


@pytest.mark.slow
def test_two_cache_builds_into_one_cache_folder(tiny_dataset, tmp_path, trained_teacher):
    recipe = _recipe(tmp_path, tiny_dataset, trained_teacher)
    cache = tmp_path / "runs" / "r-teacher-cache"
    first = _second_is_refused_while_first_holds(["cache-teacher", str(recipe)], cache, "teacher cache")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    check = subprocess.run([sys.executable, "-m", "distill", "cache-teacher", str(recipe), "--check"], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["epochs_verified"] == 2 and report["images_identical"], report


@pytest.mark.slow
def test_a_run_killed_while_holding_the_lock_resumes(tiny_dataset, tmp_path, trained_teacher):
    """SIGKILL after a checkpoint, while the run holds its folder: the kernel drops the lock, the
    lock file stays behind, and `--resume` takes the folder over and finishes the run."""
    recipe = _recipe(tmp_path, tiny_dataset, trained_teacher, epochs=4)
    run = tmp_path / "runs" / "r"
    proc = _start(["train", str(recipe)])
    state, deadline = run / "checkpoints" / "last" / "trainer_state.json", time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen with a checkpoint on disk, the lock held
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert lock.lock_file(run).read_text().startswith(f"{proc.pid} ")  # left behind by the dead process
    resumed = subprocess.run([sys.executable, "-m", "distill", "train", str(recipe), "--resume"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert not lock.lock_file(run).exists()
