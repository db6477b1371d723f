"""teachers/whitened_vgg.py: the whitening layer whitens, the fixed parts stay fixed through training,
the teacher stage starts it from the training images, and its export serves as a frozen teacher."""
from __future__ import annotations

import copy

import pytest
import torch

import teachers
from conftest import make_config, read_metrics
from teachers.whitened_vgg import LOGIT_SCALE, WHITEN_EPS, WhitenedVGG


def _correlated_images(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: neighbouring pixels and channels far from independent."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 34, 34, generator=g), 3, stride=1)
    return 2 * base.repeat(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


def test_the_first_layer_whitens_the_patches_it_was_fitted_on():
    """Jordan 2024, Sec. 3: the patches' second moment becomes the identity (up to eps); the second half
    of the filters are the first half negated."""
    images = _correlated_images()
    net = WhitenedVGG(10)
    net.init_from_images(images)
    w = net.whiten.weight.double()
    assert w.shape == (24, 3, 2, 2)
    torch.testing.assert_close(w[12:], -w[:12])
    patches = images.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    covariance = patches.T @ patches / len(patches)  # the (uncentred) second moment, as Jordan 2024
    eigenvalues = torch.linalg.eigvalsh(covariance)
    white = w[:12].reshape(12, 12) @ covariance @ w[:12].reshape(12, 12).T
    # Each filter's output variance is lambda / (lambda + eps), about 1 where the data varies far more
    # than eps; the filters' outputs are uncorrelated.
    torch.testing.assert_close(white.diag().sort().values, (eigenvalues / (eigenvalues + WHITEN_EPS)).sort().values,
                               atol=1e-6, rtol=1e-6)
    assert (white - torch.diag(white.diag())).abs().max() < 1e-6
    assert white.diag().min() > 0.9


def test_convolutions_start_as_identities_and_the_logits_are_scaled():
    net = WhitenedVGG(10)
    conv = net.features[1][0]
    x = torch.randn(2, 24, 8, 8)
    torch.testing.assert_close(conv(x)[:, :24], x)  # dirac: the first 24 filters pass their channel on
    features = torch.randn(4, 256)
    torch.testing.assert_close(net.head(features) * LOGIT_SCALE, features @ net.head.weight.T / 9)


def test_a_training_step_leaves_the_whitening_filters_and_batchnorm_scales_alone():
    torch.manual_seed(0)
    net = WhitenedVGG(10)
    net.init_from_images(_correlated_images(64))
    fixed = {k: v.clone() for k, v in net.state_dict().items()
             if k == "whiten.weight" or ("features" in k and k.endswith("weight") and v.ndim == 1)}
    assert len(fixed) == 1 + 6  # the whitening filters and six BatchNorm scales
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    optimizer.step()
    for name, before in fixed.items():
        torch.testing.assert_close(net.state_dict()[name], before, atol=0, rtol=0, msg=name)
    assert not torch.equal(net.whiten.bias, torch.zeros(24))  # the whitening bias does learn


def test_no_pretrained_weights_is_one_line_that_says_what_to_set():
    with pytest.raises(teachers.TeacherError, match=r"set teacher\.pretrained=false"):
        teachers.build_teacher_network("whitened_vgg_cifar", 10, pretrained=True)


def test_the_teacher_stage_whitens_from_the_training_images_and_exports_a_frozen_teacher(tiny_dataset, tmp_path, monkeypatch):
    """train-teacher calls init_from_images with the first training images, un-augmented, in the
    teacher's normalisation; the export loads as a frozen Teacher (BatchNorms folded) with the same
    logits; a resumed stage takes the whitening from its checkpoint instead of fitting it again."""
    from distill.loop import INIT_IMAGES, train_teacher

    seen = []
    original = WhitenedVGG.init_from_images

    def watched(self, images):
        seen.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(WhitenedVGG, "init_from_images", watched)
    cfg = make_config(tiny_dataset, tmp_path, teacher={"name": "whitened_vgg_cifar"},
                      teacher_train={"epochs": 1, "batch_size": 16, "sched": "linear", "norm_lr_scale": 64.0,
                                     "mixed_precision": "bf16", "light_augment": True})
    train_teacher(cfg)
    (images,) = seen
    assert images.shape == (min(INIT_IMAGES, 48), 3, 16, 16)
    # Un-augmented and normalised with the registered (ImageNet) statistics: the same every time.
    from distill import build
    from distill.pipeline import first_images
    stage_data = copy.deepcopy(cfg.data)
    stage_data.mean, stage_data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch.testing.assert_close(images, first_images(stage_data, build.load_data(cfg.data), 48))
    run = tmp_path / "tiny-teacher"
    assert read_metrics(run)[-1]["precision"] == "bf16"  # teacher_train.mixed_precision, not train's "no"
    export = run / "export" / "model.safetensors"
    net = WhitenedVGG(4)
    teachers.load_teacher_checkpoint(net, export, num_classes=4)
    net.eval()
    teacher = teachers.create_teacher("whitened_vgg_cifar", num_classes=4, checkpoint=str(export),
                                      optimize=teachers.TeacherOptions(precision="fp32"))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x), atol=1e-4, rtol=1e-4)
    # Resumed for one more epoch: the fixed whitening comes from the checkpoint, not from a second fit.
    fitted = net.whiten.weight.clone()
    cfg.teacher_train.epochs = 2
    with pytest.warns(UserWarning, match="stretched from 1 to 2 epochs"):
        train_teacher(cfg, resume=True)
    assert len(seen) == 1 and [h["epoch"] for h in read_metrics(run)] == [1, 2]
    teachers.load_teacher_checkpoint(net, export, num_classes=4)
    torch.testing.assert_close(net.whiten.weight, fitted, atol=0, rtol=0)
