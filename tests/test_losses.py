"""DistillationLoss against formulas written out by hand (DeiT Sec. 4, official losses.py semantics)."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import DistillationLoss

B, C = 4, 7


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * scale


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.log_softmax, so the test does not share code with the module.
    return z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))


def _ce(z: torch.Tensor, labels: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy with label smoothing eps spread uniformly over all C classes (PyTorch's definition)."""
    target = torch.full_like(z, eps / z.shape[1])
    target[torch.arange(z.shape[0]), labels] += 1.0 - eps
    return -(target * _log_softmax(z)).sum() / z.shape[0]


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """sum over batch and classes of p_t * (log p_t - log p_s) at temperature tau."""
    log_ps, log_pt = _log_softmax(student / tau), _log_softmax(teacher / tau)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


@pytest.fixture
def batch():
    labels = torch.tensor([0, 3, 6, 2])
    return _logits(0), _logits(1), labels, _logits(2, scale=4.0)


def test_none_is_base_loss_only(batch):
    cls, _, labels, _ = batch
    loss_fn = DistillationLoss("none", alpha=0.7, label_smoothing=0.1)
    loss, parts = loss_fn(cls, None, labels, None)
    torch.testing.assert_close(loss, _ce(cls, labels, eps=0.1))
    assert parts["distill"].item() == 0.0
    torch.testing.assert_close(parts["base"], loss.detach())


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_deit_normalisation(batch, tau):
    cls, dist, labels, teacher = batch
    alpha = 0.3
    loss, _ = DistillationLoss("soft", alpha=alpha, tau=tau, soft_norm="deit")(cls, dist, labels, teacher)
    distill = _kl_sum(dist, teacher, tau) * tau**2 / (B * C)  # divided by numel, like DeiT's losses.py
    torch.testing.assert_close(loss, (1 - alpha) * _ce(cls, labels) + alpha * distill)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_batchmean_normalisation(batch, tau):
    cls, dist, labels, teacher = batch
    alpha = 0.3
    loss_fn = DistillationLoss("soft", alpha=alpha, tau=tau, soft_norm="batchmean")
    loss, parts = loss_fn(cls, dist, labels, teacher)
    distill = _kl_sum(dist, teacher, tau) * tau**2 / B  # per-sample KL averaged, like timm
    torch.testing.assert_close(loss, (1 - alpha) * _ce(cls, labels) + alpha * distill)
    torch.testing.assert_close(parts["distill"], distill)


def test_deit_norm_is_batchmean_over_num_classes(batch):
    cls, dist, labels, teacher = batch
    deit = DistillationLoss("soft", soft_norm="deit", tau=2.0)
    bm = DistillationLoss("soft", soft_norm="batchmean", tau=2.0)
    (_, deit_parts), (_, bm_parts) = deit(cls, dist, labels, teacher), bm(cls, dist, labels, teacher)
    torch.testing.assert_close(deit_parts["distill"] * C, bm_parts["distill"])
    assert bm_parts["distill"] > 0


def test_soft_is_zero_when_student_matches_teacher(batch):
    cls, _, labels, teacher = batch
    loss_fn = DistillationLoss("soft", alpha=1.0, tau=3.0)
    loss, parts = loss_fn(cls, teacher.clone(), labels, teacher)
    assert abs(loss.item()) < 1e-6
    assert abs(parts["distill"].item()) < 1e-6


def test_hard_against_formula(batch):
    cls, dist, labels, teacher = batch
    loss_fn = DistillationLoss("hard", alpha=0.5, tau=123.0)  # tau is ignored by the hard kind
    loss, _ = loss_fn(cls, dist, labels, teacher)
    expected = 0.5 * _ce(cls, labels) + 0.5 * _ce(dist, teacher.argmax(dim=1))
    torch.testing.assert_close(loss, expected)


def test_hard_label_smoothing(batch):
    cls, dist, labels, teacher = batch
    loss_fn = DistillationLoss("hard", alpha=0.25, label_smoothing=0.1, hard_label_smoothing=0.2)
    loss, _ = loss_fn(cls, dist, labels, teacher)
    expected = 0.75 * _ce(cls, labels, 0.1) + 0.25 * _ce(dist, teacher.argmax(dim=1), 0.2)
    torch.testing.assert_close(loss, expected)


def test_hard_with_one_hot_teacher_is_plain_ce_on_dist_logits(batch):
    cls, dist, labels, _ = batch
    one_hot_teacher = torch.zeros(B, C)
    one_hot_teacher[torch.arange(B), labels] = 50.0
    loss_fn = DistillationLoss("hard", alpha=1.0)
    loss, _ = loss_fn(cls, dist, labels, one_hot_teacher)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(dist, labels))


def test_soft_targets_mixup_base_loss(batch):
    cls, dist, _, teacher = batch
    g = torch.Generator().manual_seed(5)
    targets = torch.softmax(torch.randn(B, C, generator=g), dim=1)  # rows sum to 1, like mixup output
    # label_smoothing is ignored for soft targets: mixup already put the smoothing inside them.
    loss_fn = DistillationLoss("soft", alpha=0.4, tau=2.0, label_smoothing=0.1)
    loss, parts = loss_fn(cls, dist, targets, teacher)
    base = -(targets * _log_softmax(cls)).sum() / B
    torch.testing.assert_close(parts["base"], base)
    torch.testing.assert_close(loss, 0.6 * base + 0.4 * _kl_sum(dist, teacher, 2.0) * 4.0 / (B * C))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_no_gradient_reaches_teacher_logits(batch, kind):
    cls, dist, labels, teacher = batch
    cls, dist = cls.requires_grad_(), dist.requires_grad_()
    teacher = teacher.clone().requires_grad_()  # even a teacher output that carries a graph
    DistillationLoss(kind, alpha=0.5, tau=2.0)(cls, dist, labels, teacher)[0].backward()
    assert teacher.grad is None
    assert cls.grad is not None and dist.grad is not None and dist.grad.abs().sum() > 0


def test_components_are_detached(batch):
    cls, dist, labels, teacher = batch
    loss_fn = DistillationLoss("soft", alpha=0.5)
    _, parts = loss_fn(cls.requires_grad_(), dist.requires_grad_(), labels, teacher)
    assert not parts["base"].requires_grad
    assert not parts["distill"].requires_grad


def test_alpha_zero_and_one_select_a_single_term(batch):
    cls, dist, labels, teacher = batch
    only_base, _ = DistillationLoss("hard", alpha=0.0)(cls, dist, labels, teacher)
    only_distill, _ = DistillationLoss("hard", alpha=1.0)(cls, dist, labels, teacher)
    torch.testing.assert_close(only_base, _ce(cls, labels))
    torch.testing.assert_close(only_distill, _ce(dist, teacher.argmax(dim=1)))
    assert not math.isclose(only_base.item(), only_distill.item())


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda c, d, y, t: (c, d[:, :-1], y, t), "dist_logits have shape"),
        (lambda c, d, y, t: (c, d, y, t[:-1]), "teacher_logits have shape"),
        (lambda c, d, y, t: (c, d, y[:-1], t), "targets have batch size"),
        (lambda c, d, y, t: (c, d, torch.rand(B, C + 1), t), "soft targets have shape"),
        (lambda c, d, y, t: (c, d, y.float(), t), "1-D floats"),
        (lambda c, d, y, t: (c, d, y, None), "needs teacher_logits"),
        (lambda c, d, y, t: (c, None, y, t), "needs dist_logits"),
    ],
)
def test_bad_inputs_raise_one_line_errors(batch, make_args, match):
    with pytest.raises(ValueError, match=match) as info:
        DistillationLoss("soft")(*make_args(*batch))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "medium"}, "unknown distillation kind"),
        ({"kind": "soft", "soft_norm": "mean"}, "unknown soft_norm"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)
