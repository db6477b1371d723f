"""Inference-only rewrites of a frozen teacher network: BatchNorm folding and channels_last.

A teacher in eval mode applies each BatchNorm as a fixed per-channel affine map, so a BatchNorm that
directly follows a convolution can be folded into that convolution's weight and bias
(``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``): one
kernel and one pass over the activations fewer per layer, the same function up to float rounding.

Everything here works on a *copy*: the network a caller passes in (and so the state dict that was
loaded, exported or fine-tuned) is never changed. ``distill train-teacher`` trains the raw network of
``teachers.build_teacher_network`` and never comes here.

timm offers two pieces and both are used: ``timm.models.reparameterize_model`` fuses the blocks that
carry their own ``fuse()`` / ``reparameterize()`` (RepVGG, MobileOne, LeViT, ...); plain ``Conv2d ->
BatchNorm2d`` pairs (ResNet, RegNet: timm has no ``fuse()`` for those) are found by tracing the
network with ``torch.fx`` and folded with ``torch.nn.utils.fusion.fuse_conv_bn_eval``. The traced
graph is only read to find the pairs; the copy keeps its own Python ``forward``.
"""
from __future__ import annotations

import copy

import torch
import torch.fx
from timm.layers import BatchNormAct2d, get_notrace_functions, get_notrace_modules
from timm.models import reparameterize_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from distill.errors import message_line

__all__ = ["fold_batchnorm", "has_conv2d", "max_logit_difference"]

# BatchNorm classes whose forward is exactly "normalise, then (for timm's BatchNormAct2d) drop + act";
# any other subclass may do something else after normalising and is left alone.
_FOLDABLE_BN = (nn.BatchNorm2d, BatchNormAct2d)


class _PairTracer(torch.fx.Tracer):
    """Keeps convolutions and BatchNorms (and the modules timm marks untraceable) as graph leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, _BatchNorm)) or type(m) in get_notrace_modules():
            return True
        return super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """Qualified names of ``(conv, bn)`` pairs where the BatchNorm is the convolution's only consumer.

    Returns the pairs and, when the network cannot be traced, the reason (then no pairs).
    """
    try:
        graph = _PairTracer(autowrap_functions=tuple(get_notrace_functions())).trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure only means "do not fold"
        return [], f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {message_line(e)[:120]})"
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _FOLDABLE_BN:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules[src.target], nn.Conv2d):
            continue
        conv, bn = modules[src.target], modules[node.target]
        # A module called twice, or a conv output read elsewhere too, cannot be rewritten in place.
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
            continue
        pairs.append((src.target, node.target))
    return pairs, None


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, str | None]:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a Conv2d folded into it.

    Returns ``(copy, number of BatchNorms folded, reason nothing could be folded or None)``. The
    argument is not modified. A folded BatchNorm becomes ``nn.Identity`` (timm's ``BatchNormAct2d``
    keeps its dropout and activation). Check the copy's outputs against the original's before using
    it (:func:`max_logit_difference`); ``Teacher.optimize`` does.
    """
    folded = copy.deepcopy(model).eval()
    reparameterize_model(folded, inplace=True)  # timm's own fuse()/reparameterize() blocks, if any
    pairs, reason = _conv_bn_pairs(folded)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, bn)
        fused.requires_grad_(False)
        _set_submodule(folded, conv_name, fused)
        _set_submodule(folded, bn_name, nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity())
    if not pairs and reason is None:
        reason = "no Conv2d -> BatchNorm2d pair found"
    return folded, len(pairs), reason


def has_conv2d(model: nn.Module) -> bool:
    """Whether ``model`` has a 2D convolution (channels_last only pays off for those)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """``(max |a(x) - b(x)|, max |a(x)|)`` in float32 with autocast off, for a tolerance check."""
    with torch.autocast(x.device.type, enabled=False):
        ya, yb = a(x).float(), b(x).float()
    return (ya - yb).abs().max().item(), ya.abs().max().item()
