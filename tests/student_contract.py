"""Checks every student must pass (the common interface of ``students.base``).

Each architecture's test file calls these on its own small configuration.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def check_interface(model: nn.Module, img_size: int, num_classes: int, batch: int = 2) -> None:
    """Training: (cls_logits, dist_logits); eval: joint = mean of the two; heads available in eval."""
    x = torch.randn(batch, 3, img_size, img_size)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2, "training forward must return (cls_logits, dist_logits)"
    assert out[0].shape == out[1].shape == (batch, num_classes)
    model.eval()
    with torch.no_grad():
        joint = model(x)
        cls_logits, dist_logits = model.forward_heads(x)
    assert joint.shape == (batch, num_classes)
    torch.testing.assert_close(joint, (cls_logits + dist_logits) / 2)


def check_backward(model: nn.Module, img_size: int, batch: int = 2) -> None:
    """A backward pass reaches every trainable parameter with a finite gradient."""
    model.train()
    cls_logits, dist_logits = model(torch.randn(batch, 3, img_size, img_size))
    (cls_logits.sum() + dist_logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def check_hard_distillation_steps(model: nn.Module, img_size: int, num_classes: int, batch: int = 4) -> None:
    """Two AdamW steps with DeiT hard distillation (alpha 0.5) lower the loss on a fixed batch."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch,))
    teacher_labels = torch.randint(0, num_classes, (batch,))

    def loss_fn() -> torch.Tensor:
        cls_logits, dist_logits = model(x)
        return 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, teacher_labels)

    model.train()
    # Dropout/drop-path would make the two measurements differ for reasons other than learning.
    for m in model.modules():
        if m.__class__.__name__ in ("Dropout", "DropPath"):
            m.p = 0.0
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < before, f"loss did not go down: {before:.4f} -> {after:.4f}"


def check_native_eval(model: nn.Module, img_size: int, num_classes: int = 1000) -> None:
    """One eval forward at the native resolution: finite joint logits, the mean of two distinct heads."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad():
        joint = model(x)
        cls_logits, dist_logits = model.forward_heads(x)
    assert joint.shape == (1, num_classes) and torch.isfinite(joint).all()
    torch.testing.assert_close(joint, (cls_logits + dist_logits) / 2)
    # The two heads read different features (or projections), so they disagree.
    assert not torch.allclose(cls_logits, dist_logits)


# --------------------------------------------------------------------------------------------------
# The family hooks (students.base.DistilledStudent): load_pretrained, token_probes, to_timm / to_hf
# --------------------------------------------------------------------------------------------------


def check_load_pretrained(model: nn.Module, source: nn.Module) -> None:
    """``load_pretrained`` takes the same student's own weights (``source``, initialised otherwise):
    afterwards every tensor is the source's."""
    state = source.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items()), "pick a source with other weights"
    report = model.load_pretrained(state)
    assert isinstance(report, dict)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"load_pretrained did not load {key}"


def check_token_probes(model: nn.Module, img_size: int, batch: int = 2) -> None:
    """``token_probes`` gives (probes, reason): each probed module outputs [B, N, D] with the class
    token at 0 and the distillation token at 1 (so N >= 2); or (None, a reason) for ``distill analyze``."""
    probes, reason = model.token_probes()
    if probes is None:
        assert isinstance(reason, str) and reason, "a family without probes says why"
        return
    assert probes, "an empty probe list: return (None, reason) instead"
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out))
             for name, module in probes if module is not None]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(batch, 3, img_size, img_size))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(outputs) == {name for name, module in probes if module is not None}, "a probed module never ran"
    for name, out in outputs.items():
        assert isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[0] == batch and out.shape[1] >= 2, \
            f"probe {name} outputs {getattr(out, 'shape', type(out))}, not [B, N >= 2, D]"


def check_exports(model: nn.Module, folder) -> None:
    """``to_timm`` / ``to_hf``: for each format, ``distill export`` of the joint and the class head
    either writes a folder whose logits it verified against the student's, or refuses in one line;
    a family that refuses every head says it has no equivalent."""
    from distill.export import ExportError, export_student
    from students import save_student

    save_student(model.eval(), folder / "export")
    for format in ("timm", "hf"):
        refusals = []
        for head in ("joint", "cls"):
            try:
                out = export_student(folder / "export", format, out=folder / f"{format}_{head}", head=head)
            except ExportError as e:
                assert "\n" not in str(e), str(e)
                refusals.append(str(e))
            else:
                assert (out / "model.safetensors").is_file()
        if len(refusals) == 2:
            assert re.search(r"has no (timm or transformers|timm|transformers) equivalent", refusals[-1]), refusals[-1]
