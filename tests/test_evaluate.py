"""Accuracy of every head, the teacher, and agreement, against numbers computed by hand."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.build import OnlineTeacher, new_accelerator
from distill.evaluation import evaluate, format_table
from students.base import DistilledStudent


class FixedHeads(DistilledStudent):
    """A 'student' whose two heads return stored logits for sample i (x holds the index)."""

    def __init__(self, cls_logits, dist_logits):
        super().__init__()
        self.cls_logits, self.dist_logits = cls_logits, dist_logits

    def forward_heads(self, x):
        i = x[:, 0].long()
        return self.cls_logits[i], self.dist_logits[i]

    def forward(self, x):
        c, d = self.forward_heads(x)
        return (c + d) / 2


def test_every_head_teacher_and_agreement_match_hand_computation():
    torch.manual_seed(0)
    n, c = 37, 6  # 37 is not a multiple of the batch size: the last batch is partial
    y = torch.randint(0, c, (n,))
    cls_logits, dist_logits, teacher_logits = torch.randn(n, c), torch.randn(n, c), torch.randn(n, c)
    # Items are (x, label, sample index), as distill.pipeline.val_loader gives them.
    loader = DataLoader(TensorDataset(torch.arange(n).float()[:, None], y, torch.arange(n)), batch_size=8)
    teacher = lambda x: teacher_logits[x[:, 0].long()]  # noqa: E731
    accelerator = new_accelerator(cpu=True)
    targets = OnlineTeacher(teacher, n, c)
    got = evaluate(FixedHeads(cls_logits, dist_logits), loader, accelerator, targets)

    def top(logits, k):
        return round(100.0 * (logits.topk(k, 1).indices == y[:, None]).any(1).float().mean().item(), 2)

    joint = (cls_logits + dist_logits) / 2
    # The paper's joint classifier: the two heads' softmax outputs added (halved: same ranking).
    probs = (torch.exp(cls_logits) / torch.exp(cls_logits).sum(1, keepdim=True)
             + torch.exp(dist_logits) / torch.exp(dist_logits).sum(1, keepdim=True)) / 2
    assert (probs.argmax(1) != joint.argmax(1)).any()  # the two rules disagree on some samples here
    expected = {"cls_top1": top(cls_logits, 1), "cls_top5": top(cls_logits, 5), "dist_top1": top(dist_logits, 1),
                "dist_top5": top(dist_logits, 5), "joint_top1": top(joint, 1), "joint_top5": top(joint, 5),
                "joint_softmax_top1": top(probs, 1), "joint_softmax_top5": top(probs, 5),
                "teacher_top1": top(teacher_logits, 1), "teacher_top5": top(teacher_logits, 5),
                "agreement_top1": round(100.0 * (joint.argmax(1) == teacher_logits.argmax(1)).float().mean().item(), 2)}
    assert got == expected
    # The teacher's top-5 are kept per sample and reused: a second pass gives the same numbers
    # without calling the teacher, and a store filled by a teacher cache needs no teacher at all.
    assert torch.equal(targets.top5, teacher_logits.topk(5, 1).indices)
    targets.teacher = lambda x: 1 / 0
    assert evaluate(FixedHeads(cls_logits, dist_logits), loader, accelerator, targets) == expected

    class Stored:  # what a teacher cache gives: the stored predictions, no teacher network
        def val_top5(self, indices, images):
            return teacher_logits.topk(5, 1).indices[indices]

    assert evaluate(FixedHeads(cls_logits, dist_logits), loader, accelerator, Stored()) == expected


def test_agreement_follows_the_configured_joint_rule():
    """A student configured with student.joint=softmax is compared with the teacher through that rule."""
    torch.manual_seed(1)
    n, c = 64, 5
    y = torch.randint(0, c, (n,))
    cls_logits, dist_logits = torch.randn(n, c) * 3, torch.randn(n, c)
    probs = (cls_logits.softmax(1) + dist_logits.softmax(1)) / 2
    joint = (cls_logits + dist_logits) / 2
    teacher_logits = probs.clone()  # the teacher predicts exactly what the softmax joint head predicts
    loader = DataLoader(TensorDataset(torch.arange(n).float()[:, None], y), batch_size=16)
    teacher = lambda x: teacher_logits[x[:, 0].long()]  # noqa: E731
    model = FixedHeads(cls_logits, dist_logits)
    model.joint = "softmax"
    got = evaluate(model, loader, new_accelerator(cpu=True), OnlineTeacher(teacher, n, c))
    assert got["agreement_top1"] == 100.0
    model.joint = "logits"
    got = evaluate(model, loader, new_accelerator(cpu=True), OnlineTeacher(teacher, n, c))
    expected = round(100.0 * (joint.argmax(1) == probs.argmax(1)).float().mean().item(), 2)
    assert got["agreement_top1"] == expected < 100.0


def test_plain_classifier_reports_top1_top5():
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.eye(4)[[0, 1, 3, 2]] * 5
    model = nn.Sequential()  # identity on the input
    loader = DataLoader(TensorDataset(logits, y), batch_size=2)
    got = evaluate(model, loader, new_accelerator(cpu=True))
    assert got == {"top1": 50.0, "top5": 100.0}


def test_format_table():
    table = format_table({"a": {"x": 1.0}, "bb": {"y": 2.5}}, ["x", "y"])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].split() == ["a", "1.00", "-"] and lines[2].split() == ["bb", "-", "2.50"]
