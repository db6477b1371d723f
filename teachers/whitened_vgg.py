"""``whitened_vgg_cifar``: a small wide VGG for 32x32 images that trains to a strong CIFAR-10 teacher
in minutes of CPU time (docs/benchmarks.md, "CIFAR-10 in 2.5 hours").

The network follows the ingredients of the public fast-CIFAR recipes (K. Jordan, "94% on CIFAR-10 in
3.29 seconds on a single GPU", 2024, Sec. 3; airbench94), written here from their description:

* a first 2x2 convolution that whitens the image's patches, fixed from data before training
  (``init_from_images``): its filters are the eigenvectors of the 2x2 patches' second moment scaled by
  1/sqrt(eigenvalue + eps), and their negatives, so that the GELU after it keeps both signs;
* three groups of conv - max-pool - BatchNorm - GELU - conv - BatchNorm - GELU at widths
  64/256/256, each convolution started as a partial identity (dirac), an implicit residual path;
* BatchNorm with its scale fixed at 1 (only the shift learns) and running statistics that follow
  the batches closely (momentum 0.4);
* the logits scaled by 1/9, a fixed temperature that lets the learning rate be high.

The network is kept in channels_last, the layout in which oneDNN runs bf16 convolutions fast on a
CPU (the teacher stage trains at about 1,000 images/s on 2 cores: docs/benchmarks.md).
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from teachers.registry import register_teacher
from teachers.teacher import TeacherError

# Jordan 2024's values (airbench94: whitening kernel 2, eps 5e-4, BatchNorm momentum 0.6 in their
# convention = 0.4 in PyTorch's, output scale 1/9, widths 64/256/256).
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4
BN_MOMENTUM = 0.4
LOGIT_SCALE = 1 / 9


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=BN_MOMENTUM)
    norm.weight.requires_grad_(False)  # the scale stays 1: only the shift learns
    return norm


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])  # the first filters pass their input channel on
    return conv


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_conv(cin, cout), nn.MaxPool2d(2), _norm(cout), nn.GELU(),
                         _conv(cout, cout), _norm(cout), nn.GELU())


class WhitenedVGG(nn.Module):
    """The network; ``init_from_images`` sets the whitening layer from training images."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), in_chans: int = 3) -> None:
        super().__init__()
        whiten_width = 2 * in_chans * WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)  # fixed from data; its bias learns
        self.features = nn.Sequential(nn.GELU(), ConvGroup(whiten_width, widths[0]), ConvGroup(widths[0], widths[1]),
                                      ConvGroup(widths[1], widths[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        nn.init.zeros_(self.whiten.bias)
        self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor) -> None:
        """The whitening filters from ``images`` (N, C, H, W), normalised as the network sees them."""
        k, c = WHITEN_KERNEL, images.shape[1]
        if images.ndim != 4 or images.shape[-1] < k or images.shape[-2] < k:
            raise TeacherError(f"whitened_vgg_cifar needs a batch of images (N, C, H, W) to whiten, got {tuple(images.shape)}")
        patches = images.double().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + WHITEN_EPS)[:, None]).reshape(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.whiten(x.contiguous(memory_format=torch.channels_last)))
        return self.head(self.pool(x).flatten(1)) * LOGIT_SCALE


# ImageNet's mean/std like the other CIFAR teachers: the same normalisation as a DeiT student, so the
# frozen Teacher's input conversion is a no-op (teachers/registry.py).
@register_teacher("whitened_vgg_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def whitened_vgg_cifar(num_classes: int, pretrained: bool = False, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    """The fast CIFAR teacher (no pretrained weights: `distill train-teacher` trains it in minutes)."""
    if pretrained:
        raise TeacherError("whitened_vgg_cifar has no pretrained weights; set teacher.pretrained=false and train it with `distill train-teacher`")
    return WhitenedVGG(num_classes, tuple(widths))
