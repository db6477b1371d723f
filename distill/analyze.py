"""``distill analyze``: what the distillation token learned (DeiT, Touvron et al. 2021, Sec. 4).

DeiT Sec. 4 observes that the *learned* class and distillation token embeddings are nearly
orthogonal (cosine 0.06), while the two tokens' outputs grow more similar layer after layer, up to
a cosine of 0.93 at the last layer: similar but not identical, since the two heads aim at similar
but different targets (the labels and the teacher). ``analyze_run`` measures the same things on a
trained student, plus how its heads and the teacher agree:

* ``token_cosine``: the cosine between the learned token embeddings (the parameters), and, layer by
  layer, the cosine between the two tokens' outputs, averaged over the validation images;
* ``agreement``: the top-1 agreement between the class head, the distillation head, the joint head
  (the student's ``student.joint`` rule) and the teacher, a 4x4 table in percent;
* ``top1``: each head's accuracy, the joint head under both rules (logits and softmax);
* ``confusion``: the joint head's confusion matrix (rows: true class, columns: prediction).

Where the tokens live differs by student family, so each family's ``token_probes()``
(``students.base.DistilledStudent``) lists the modules whose outputs hold the class token at
position 0 and the distillation token at position 1. A student without two tokens reports the
cosine as not applicable, with the reason.

The result is written as ``analysis.json`` and, with matplotlib, ``analysis.png`` (``distill.plots``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill import atomic, plots
from distill.errors import InputError
from distill.evaluation import model_joint
from distill.rundir import load_run, prepare_eval
from students.base import DistilledStudent

ANALYSIS_JSON = "analysis.json"
# What the DeiT paper reports for its distilled model (Touvron et al. 2021, Sec. 4): the learned class
# and distillation tokens have cosine 0.06; their outputs grow more similar layer by layer, up to 0.93
# at the last layer.
PAPER_LEARNED_TOKEN_COSINE = 0.06
PAPER_LAST_LAYER_COSINE = 0.93


def learned_token_cosine(model: nn.Module) -> float:
    """Cosine between the learned class and distillation token embeddings (DeiT Sec. 4: 0.06)."""
    return float(F.cosine_similarity(model.cls_token.flatten().float(), model.dist_token.flatten().float(), dim=0))


def _gather_tokens(outputs: dict[str, torch.Tensor]):
    def hook(name):
        def fn(_module, _inputs, output):
            outputs[name] = F.cosine_similarity(output[:, 0].float(), output[:, 1].float(), dim=-1)
        return fn
    return hook


@torch.no_grad()
def analyze(model: nn.Module, loader, accelerator, teacher: nn.Module | None = None,
            class_names: list[str] | None = None) -> dict:
    """Token cosines, head/teacher agreement, accuracies and the joint confusion matrix over ``loader``."""
    inner = accelerator.unwrap_model(model)
    if not isinstance(inner, DistilledStudent):
        raise InputError(f"{type(inner).__name__} has no class and distillation heads; `distill analyze` needs a student")
    joint = model_joint(inner)
    probes, reason = inner.token_probes()
    hooked = [(name, module) for name, module in probes or [] if module is not None]  # None: the learned tokens
    names = ["cls", "dist", "joint"] + (["teacher"] if teacher is not None else [])
    labels, preds, layer_cos = _predict_all(model, inner, loader, accelerator, teacher, joint, hooked, names)
    y = torch.cat(labels)
    if len(y) == 0:
        raise InputError("the evaluation split is empty; check data.val_split or --split")
    p = {k: torch.cat(v) for k, v in preds.items()}

    def pct(mask: torch.Tensor) -> float:
        return round(100.0 * mask.float().mean().item(), 2)

    num_classes = int(getattr(inner, "num_classes", 0)) or int(max(y.max(), p["joint"].max())) + 1
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts.index_put_((y, p["joint"]), torch.ones_like(y), accumulate=True)
    top1 = {"cls": pct(p["cls"] == y), "dist": pct(p["dist"] == y), "joint_logits": pct(p["joint_logits"] == y),
            "joint_softmax": pct(p["joint_softmax"] == y)}
    if teacher is not None:
        top1["teacher"] = pct(p["teacher"] == y)
    return {
        "student": inner.student_name,
        "joint": joint,
        # What the exported model predicts with in eval mode: "joint", or "cls" for a student trained
        # without a teacher (its distillation head got no loss).
        "eval_head": getattr(inner, "eval_head", "joint"),
        "num_images": len(y),
        "token_cosine": _token_cosine(inner, probes, reason, hooked, layer_cos),
        "top1": top1,
        "agreement": {"names": names, "top1": [[pct(p[a] == p[b]) for b in names] for a in names]},
        "confusion": {"head": f"joint ({joint})", "class_names": list(class_names or range(num_classes)),
                      "counts": counts.tolist()},
    }


def _predict_all(model: nn.Module, inner: DistilledStudent, loader, accelerator, teacher: nn.Module | None,
                 joint: str, hooked: list[tuple[str, nn.Module]], names: list[str]):
    """``(labels, predictions per head, token cosines per layer)`` of every batch, gathered over the
    processes; the hooks on the ``hooked`` modules record the two tokens' cosines."""
    joint_key = "joint_softmax" if joint == "softmax" else "joint"
    cosines: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(_gather_tokens(cosines)(name)) for name, module in hooked]
    model.eval()
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in names + ["joint_softmax", "joint_logits"]}
    labels, layer_cos = [], []
    try:
        for x, y, *_ in loader:
            with accelerator.autocast():
                heads = inner.heads(x)
                batch = {"cls": heads["cls"], "dist": heads["dist"], "joint": heads[joint_key],
                         "joint_softmax": heads["joint_softmax"], "joint_logits": heads["joint"]}
                if teacher is not None:
                    batch["teacher"] = teacher(x).float()
            batch = {k: v.argmax(dim=1) for k, v in batch.items()}
            cos = torch.stack([cosines[name] for name, _ in hooked], dim=1) if hooked else torch.zeros(len(y), 0)
            batch, y, cos = accelerator.gather_for_metrics((batch, y, cos.to(y.device)))
            for k, v in batch.items():
                preds[k].append(v.cpu())
            labels.append(y.cpu())
            layer_cos.append(cos.cpu())
    finally:
        for handle in handles:
            handle.remove()
    return labels, preds, layer_cos


def _token_cosine(inner: DistilledStudent, probes, reason: str, hooked: list[tuple[str, nn.Module]],
                  layer_cos: list[torch.Tensor]) -> dict:
    """The learned tokens' cosine and, layer by layer, their outputs' (or why not applicable), beside
    what DeiT Sec. 4 reports."""
    if probes:
        per_layer = dict(zip((name for name, _ in hooked), torch.cat(layer_cos).mean(dim=0).tolist()))
        learned = learned_token_cosine(inner)
        layers = [{"name": name, "cosine": round(learned if module is None else per_layer[name], 4)}
                  for name, module in probes]
        token_cosine = {"applicable": True, "learned_tokens": round(learned, 4), "last_layer": layers[-1]["cosine"],
                        "layers": layers}
    else:
        token_cosine = {"applicable": False, "reason": reason}
    token_cosine["paper"] = {"learned_tokens": PAPER_LEARNED_TOKEN_COSINE,
                             "last_layer": PAPER_LAST_LAYER_COSINE,
                             "source": "DeiT (Touvron et al. 2021), Sec. 4"}
    return token_cosine


def analyze_run(path: str | Path, data: str | None = None, split: str | None = None, batch_size: int = 256,
                teacher_checkpoint: str | None = None, num_workers: int = 2, cpu: bool = False,
                out: str | Path | None = None, plot: bool = True) -> dict:
    """``distill analyze``: run :func:`analyze` on a run folder (or export folder) and write
    ``analysis.json`` (+ ``analysis.png``) into ``out`` (default ``<path>/analysis``).

    The run is loaded exactly as ``distill eval`` loads it (its config.yaml names the data and the
    teacher). A run folder's training curves (``training_curves.png``) are (re)drawn too.
    """
    out = Path(out) if out is not None else Path(path) / "analysis"
    if out.exists() and not out.is_dir():  # found before any work, not by mkdir at the end
        raise InputError(f"{out} is a file; pass a folder as --out (analysis.json and analysis.png go into it)")
    run = load_run(path, data=data, split=split, teacher_checkpoint=teacher_checkpoint)
    accelerator, model, loader = prepare_eval(run, batch_size=batch_size, num_workers=num_workers, cpu=cpu)
    result = {"run": str(path), **analyze(model, loader, accelerator, run.teacher, run.info.get("class_names"))}
    result["files"] = {"json": str(out / ANALYSIS_JSON), "png": None, "training_curves": None}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if plot:
            png = plots.save_analysis_plots(result, out)
            result["files"]["png"] = None if png is None else str(png)
            if (Path(path) / "metrics.jsonl").is_file() and png is not None:
                result["files"]["training_curves"] = str(plots.save_training_curves(path))
        atomic.write_text(out / ANALYSIS_JSON, json.dumps(result, indent=2) + "\n")
    return result


def format_summary(result: dict) -> str:
    """A few lines for the terminal: token cosines against the paper's, accuracies, agreement table."""
    tc = result["token_cosine"]
    lines = []
    if tc["applicable"]:
        lines.append(f"learned class/distillation token cosine: {tc['learned_tokens']:.3f}   "
                     f"(DeiT Sec. 4: {tc['paper']['learned_tokens']})")
        lines.append(f"token output cosine at the last layer:   {tc['last_layer']:.3f}   "
                     f"(DeiT Sec. 4: {tc['paper']['last_layer']})")
        lines.append("by layer: " + ", ".join(f"{layer['name']} {layer['cosine']:.2f}" for layer in tc["layers"]))
    else:
        lines.append(f"token cosine: not applicable ({tc['reason']})")
    lines.append("top-1 (%): " + ", ".join(f"{k} {v:.2f}" for k, v in result["top1"].items()))
    names = result["agreement"]["names"]
    lines.append(f"top-1 agreement (%), joint = {result['joint']} rule:")
    lines.append(f"{'':>9}" + "".join(f"{n:>9}" for n in names))
    for n, row in zip(names, result["agreement"]["top1"]):
        lines.append(f"{n:>9}" + "".join(f"{v:>9.2f}" for v in row))
    files = [f for f in (result["files"]["json"], result["files"]["png"], result["files"]["training_curves"]) if f]
    lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)
