"""distill.weights: safe loading of state dicts in the layouts found in the wild."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distill.weights import WeightsError, load_state_dict_file, unwrap_state_dict


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return {k: v.clone() for k, v in net.state_dict().items()}


class _Payload:
    """Unpickling this creates ``marker``: stands in for any code a malicious checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "layout",
    ["bare", "model", "state_dict", "module_prefix", "model_and_module_prefix", "orig_mod_prefix", "safetensors"],
)
def test_layouts_load_identical_weights(tmp_path, layout):
    sd = _state()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "bare":
        torch.save(sd, path)
    elif layout == "model":
        torch.save({"model": sd, "epoch": 3, "optimizer": {"state": {}}}, path)
    elif layout == "state_dict":
        torch.save({"state_dict": sd}, path)
    elif layout == "module_prefix":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif layout == "model_and_module_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "orig_mod_prefix":
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)
    else:
        save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_state_dict_file(path)
    assert sorted(loaded) == sorted(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    # The payload is real: a plain unpickle of it does create its marker file ...
    proof = tmp_path / "proof_marker"
    pickle.loads(pickle.dumps(_Payload(str(proof))))
    assert proof.exists()
    # ... but loading the same kind of checkpoint through distill.weights refuses it first.
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match="refused") as info:
        load_state_dict_file(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint\n"])
def test_corrupt_files_raise_weights_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError):
        load_state_dict_file(path)


def test_corrupt_safetensors_raises(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_state_dict_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pth")


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "best_acc": 0.5}, path)
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_state_dict_file(path)


def test_unwrap_rejects_non_dict():
    with pytest.raises(WeightsError, match="not a state dict"):
        unwrap_state_dict([torch.zeros(1)])
