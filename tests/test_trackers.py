"""`train.log_with`: Accelerate's trackers by name, the old `train.tensorboard` key, a tracker that is
not installed, and (slow) TensorBoard end to end, read back with TensorBoard's own reader."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import accelerate.utils
import pytest

from distill.cli import main as cli
from distill.config import ConfigError
from distill.recipes import dump, from_dict, load_recipe, to_dict
from distill.loop import train

from conftest import REPO, make_config, read_metrics


def test_log_with_takes_one_tracker_or_a_list(tiny_recipe):
    assert load_recipe(tiny_recipe).train.log_with is None
    assert load_recipe(tiny_recipe, ["train.log_with=wandb"]).train.log_with == "wandb"
    cfg = load_recipe(tiny_recipe, ["train.log_with=[tensorboard, mlflow]"])
    assert cfg.train.log_with == ["tensorboard", "mlflow"]
    assert from_dict(to_dict(cfg)).train.log_with == ["tensorboard", "mlflow"]  # the run's config.yaml reads back
    assert "log_with:\n  - tensorboard\n  - mlflow\n" in dump(cfg)


def test_an_unknown_tracker_names_the_closest(tiny_recipe):
    with pytest.raises(ConfigError, match=r"'tensorbord' is not one of Accelerate's trackers .*did you mean 'tensorboard'\?"):
        load_recipe(tiny_recipe, ["train.log_with=[wandb, tensorbord]"])
    with pytest.raises(ConfigError, match="must be a string or a list of strings or null"):
        load_recipe(tiny_recipe, ["train.log_with={a: 1}"])


def test_old_tensorboard_key_still_works_with_one_line(tiny_recipe):
    with pytest.warns(FutureWarning, match="train.tensorboard is deprecated; it is read as train.log_with: tensorboard"):
        assert load_recipe(tiny_recipe, ["train.tensorboard=true"]).train.log_with == "tensorboard"
    with pytest.warns(FutureWarning):
        cfg = load_recipe(tiny_recipe, ["train.log_with=wandb", "train.tensorboard=true"])
    assert cfg.train.log_with == ["wandb", "tensorboard"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an older run's config.yaml says `tensorboard: false`: nothing to say
        assert from_dict({"train": {"tensorboard": False}}).train.log_with is None
        assert load_recipe(tiny_recipe, ["train.log_with=tensorboard", "train.tensorboard=false"]).train.log_with is None
    with pytest.raises(ConfigError, match="'train.tensorboard' must be true or false"):
        load_recipe(tiny_recipe, ["train.tensorboard=wandb"])

    # On the command line: one `warning:` line, and the resolved config has the new key only.
    result = subprocess.run([sys.executable, "-m", "distill", "train", str(tiny_recipe), "train.tensorboard=true",
                             "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr.splitlines() == [
        "warning: command line: train.tensorboard is deprecated; it is read as train.log_with: tensorboard"]
    assert "  log_with: tensorboard\n" in result.stdout and "tensorboard:" not in result.stdout


def test_a_tracker_that_is_not_installed_is_one_line_before_any_work(tiny_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    assert cli(["train", str(tiny_recipe), "train.log_with=[tensorboard, comet_ml]"]) == 2
    assert capsys.readouterr().err == ("error: train.log_with=comet_ml needs the comet_ml package, which is not "
                                       "installed: pip install comet-ml\n")
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.slow
def test_tensorboard_gets_every_epoch_offline(tiny_dataset, tmp_path, trained_teacher):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)},
                      train={"epochs": 2, "log_with": "tensorboard"})
    train(cfg)
    history = read_metrics(tmp_path / "tiny")
    events = list((tmp_path / "tiny" / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].parent == tmp_path / "tiny" / "tb" / "tiny"
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    scalars = board.Tags()["scalars"]
    numbers = [k for k, v in history[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert {"train_loss", "joint_top1", "teacher_top1", "time_s"} <= set(numbers) and set(numbers) <= set(scalars)
    for key in numbers:
        points = board.Scalars(key)
        assert [p.step for p in points] == [h["step"] for h in history], key  # one point per epoch, at its step
        assert all(math.isclose(p.value, h[key], rel_tol=1e-6) for p, h in zip(points, history)), key  # float32
