"""Tests for distill/atomic.py: whole-or-nothing folder and file writes, the path a written file
names, the one-line reason of a failed write and the "did you mean" choice."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from distill.atomic import closest, relative_path, staging, write_dir, write_error, write_json, write_text


def _old_folder(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.safetensors").write_text("old weights")
    return target


def test_write_dir_replaces_the_folder_with_what_the_writer_wrote(tmp_path):
    target = _old_folder(tmp_path)

    def write(folder):
        assert folder == staging(target) and folder.is_dir() and not list(folder.iterdir())
        (folder / "config.json").write_text("{}")

    assert write_dir(target, write) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # the old file went with the old folder
    assert not staging(target).exists()


def test_a_failing_writer_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    target = _old_folder(tmp_path)

    def write(folder):
        (folder / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_dir(target, write)
    assert (target / "model.safetensors").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .export.tmp left
    with pytest.raises(KeyboardInterrupt):  # an interrupt is cleaned up the same way
        write_dir(tmp_path / "new", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_write_dir_starts_from_an_empty_staging_folder(tmp_path):
    """What an interrupted earlier write left in the staging folder is not carried into the new one."""
    target = tmp_path / "cache"
    staging(target).mkdir()
    (staging(target) / "stale.npy").write_text("from a killed run")
    write_dir(target, lambda folder: (folder / "fresh.npy").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["fresh.npy"]


def test_write_text_and_json_replace_the_file_in_one_step(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_json(path, {"top1": 81.2, "heads": ["cls", "dist"]})
    assert json.loads(path.read_text()) == {"top1": 81.2, "heads": ["cls", "dist"]}
    assert path.read_text().endswith("\n")
    write_text(path, "new text")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]

    def refuse(src, dst):  # the rename fails: the old file stays, the temporary one goes
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_text(path, "lost")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_relative_path_is_relative_to_the_folder_written_into(tmp_path, monkeypatch):
    assert relative_path(tmp_path / "runs" / "a" / "export", tmp_path / "runs" / "b") == os.path.join("..", "a", "export")
    assert relative_path(tmp_path / "x.png", tmp_path) == "x.png"
    monkeypatch.chdir(tmp_path)
    assert relative_path("runs/a", tmp_path / "runs") == "a"  # a relative path is read from the working directory


def test_write_error_names_the_os_reason():
    assert write_error(OSError(errno.ENOSPC, "No space left on device"), Path("."))[0] == "no space left on the device"
    what, todo = write_error(RuntimeError("I/O error: File too large (os error 27)"), Path("."))
    assert (what, todo) == ("a file grew past the file-size limit", "raise the limit (ulimit -f)")


def test_closest_suggests_the_nearest_choice_or_none():
    assert closest("deit_tiyn", ["deit_tiny", "deit_small", "cait_xxs24"]) == "deit_tiny"
    assert closest("optim.lrr", ["optim.lr", "optim.weight_decay"]) == "optim.lr"
    assert closest("zzz", ["deit_tiny", "deit_small"]) is None
    assert closest(3, [1, 2, 3]) == "3"
