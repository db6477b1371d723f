"""Checks every student must pass (the common interface of ``students.base``).

Each architecture's test file calls these on its own small configuration.
"""
from __future__ import annotations

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
