"""`distill analyze`: token cosines by layer (DeiT Sec. 4), head/teacher agreement and confusion,
checked against hand computation; the run-folder API, the CLI and the plots."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from distill.analyze import analyze, analyze_run
from distill.cli import main as cli
from distill.build import new_accelerator
from students import create_student

from conftest import tiny_config


def student(name: str, **kw):
    torch.manual_seed(0)
    sizes = {"cmt_ti": {}, "dhvt_tiny_cifar_p4": dict(embed_dim=32, depth=2, num_heads=2)}
    args = sizes.get(name, dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    return create_student(name, num_classes=4, img_size=16 if name != "cmt_ti" else 32, **{**args, **kw}).eval()


def loader_of(n: int = 20, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=6), x, y  # 20 = 3 full batches + a partial one


def deit_token_cosines_by_hand(model, x):
    """The DeiT forward written out: input sequence, each block, final norm; cosine of tokens 0 and 1."""
    with torch.no_grad():
        seq = model.patch_embed(x)
        b = seq.shape[0]
        seq = torch.cat([model.cls_token.expand(b, -1, -1), model.dist_token.expand(b, -1, -1), seq], 1) + model.pos_embed
        outputs = [seq]
        for block in model.blocks:
            seq = block(seq)
            outputs.append(seq)
        outputs.append(model.norm(seq))
    return [F.cosine_similarity(o[:, 0], o[:, 1], dim=-1).mean().item() for o in outputs]


def test_deit_token_cosines_agreement_and_confusion_match_hand_computation():
    model = student("deit_tiny")
    with torch.no_grad():  # trained-looking heads: O(1) weights so the heads disagree on some images
        model.head.weight.normal_(0, 2)
        model.head_dist.weight.normal_(0, 2)
    loader, x, y = loader_of()
    teacher_w = torch.randn(3 * 16 * 16, 4, generator=torch.Generator().manual_seed(3))
    teacher = lambda images: images.flatten(1) @ teacher_w  # noqa: E731  any callable returning logits

    result = analyze(model, loader, new_accelerator(cpu=True), teacher, class_names=list("abcd"))

    tc = result["token_cosine"]
    assert tc["applicable"] and result["num_images"] == 20
    assert [layer["name"] for layer in tc["layers"]] == ["input", "block 1", "block 2", "norm (heads)"]
    expected = deit_token_cosines_by_hand(model, x)
    assert [layer["cosine"] for layer in tc["layers"]] == pytest.approx(expected, abs=1e-4)
    assert tc["last_layer"] == tc["layers"][-1]["cosine"]
    learned = F.cosine_similarity(model.cls_token.flatten(), model.dist_token.flatten(), dim=0).item()
    assert tc["learned_tokens"] == pytest.approx(learned, abs=1e-4)
    assert tc["paper"]["learned_tokens"] == 0.06 and tc["paper"]["last_layer"] == 0.93
    # The head inputs are what forward_features returns: the last layer is their cosine.
    cls_feat, dist_feat = model.forward_features(x)
    assert tc["last_layer"] == pytest.approx(F.cosine_similarity(cls_feat, dist_feat).mean().item(), abs=1e-4)

    with torch.no_grad():
        c, d = model.forward_heads(x)
    preds = {"cls": c.argmax(1), "dist": d.argmax(1), "joint": ((c + d) / 2).argmax(1),
             "teacher": teacher(x).argmax(1)}
    assert result["agreement"]["names"] == ["cls", "dist", "joint", "teacher"]
    table = result["agreement"]["top1"]
    for i, a in enumerate(preds):
        for j, b in enumerate(preds):
            assert table[i][j] == round(100.0 * (preds[a] == preds[b]).float().mean().item(), 2), (a, b)
    assert table[0][1] < 100.0  # the class and distillation heads do disagree here
    softmax_joint = (c.softmax(1) + d.softmax(1)).argmax(1)
    assert result["top1"] == {"cls": round(100.0 * (preds["cls"] == y).float().mean().item(), 2),
                              "dist": round(100.0 * (preds["dist"] == y).float().mean().item(), 2),
                              "joint_logits": round(100.0 * (preds["joint"] == y).float().mean().item(), 2),
                              "joint_softmax": round(100.0 * (softmax_joint == y).float().mean().item(), 2),
                              "teacher": round(100.0 * (preds["teacher"] == y).float().mean().item(), 2)}
    counts = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(y, preds["joint"]):
        counts[t, p] += 1
    assert result["confusion"]["counts"] == counts.tolist() and result["confusion"]["class_names"] == list("abcd")
    assert result["confusion"]["head"] == "joint (logits)"


def test_softmax_joint_rule_drives_agreement_and_confusion():
    model = student("deit_tiny")
    model.joint = "softmax"
    with torch.no_grad():
        model.head.weight.normal_(0, 3)
        model.head_dist.weight.normal_(0, 0.5)
    loader, x, y = loader_of()
    result = analyze(model, loader, new_accelerator(cpu=True))
    with torch.no_grad():
        c, d = model.forward_heads(x)
    joint = (c.softmax(1) + d.softmax(1)).argmax(1)
    assert result["joint"] == "softmax" and result["agreement"]["names"] == ["cls", "dist", "joint"]
    assert result["agreement"]["top1"][0][2] == round(100.0 * (c.argmax(1) == joint).float().mean().item(), 2)
    assert sum(map(sum, result["confusion"]["counts"])) == 20
    assert [row[i] for i, row in enumerate(result["confusion"]["counts"])] == [
        int(((y == k) & (joint == k)).sum()) for k in range(4)]


@pytest.mark.parametrize("name, names, last_is_head_input", [
    ("cait_xxs24", ["tokens (input)", "class-attn 1", "class-attn 2", "norm (heads)"], True),
    ("dhvt_tiny_cifar_p4", ["input", "block 1", "block 2", "norm (heads)"], True),
])
def test_token_families(name, names, last_is_head_input):
    """CaiT: the tokens exist only in the class-attention stage; DHVT: tokens from the input on."""
    model = student(name)
    loader, x, _ = loader_of()
    tc = analyze(model, loader, new_accelerator(cpu=True))["token_cosine"]
    assert tc["applicable"] and [layer["name"] for layer in tc["layers"]] == names
    learned = F.cosine_similarity(model.cls_token.flatten(), model.dist_token.flatten(), dim=0).item()
    assert tc["learned_tokens"] == pytest.approx(learned, abs=1e-4)
    if name == "cait_xxs24":
        assert tc["layers"][0]["cosine"] == tc["learned_tokens"]
    else:  # DHVT adds no position embedding: its input tokens are the learned embeddings themselves
        assert tc["layers"][0]["cosine"] == pytest.approx(learned, abs=1e-4)
    cls_feat, dist_feat = model.forward_features(x)
    assert tc["last_layer"] == pytest.approx(F.cosine_similarity(cls_feat, dist_feat).mean().item(), abs=1e-4)


@pytest.mark.parametrize("name, reason", [("vit_tiny", "single (class) token"), ("cmt_ti", "no class or distillation token")])
def test_students_without_two_tokens_report_not_applicable(name, reason):
    model = student(name)
    assert model.token_probes()[0] is None and reason in model.token_probes()[1]
    loader, _, _ = loader_of(size=32 if name == "cmt_ti" else 16)
    result = analyze(model, loader, new_accelerator(cpu=True))
    assert result["token_cosine"]["applicable"] is False and reason in result["token_cosine"]["reason"]
    assert len(result["agreement"]["top1"]) == 3  # the heads still are compared


# ------------------------------------------------------------------------------------------------
# A trained run folder: analyze_run, the CLI, the plots


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A 1-epoch distilled run (teacher fine-tuned first) on the tiny image folder."""
    import distill
    from distill.config import Config
    from distill.recipes import update

    out = tmp_path_factory.mktemp("analyze_runs")
    raw = tiny_config(tiny_dataset, out)
    raw["train"]["epochs"] = 1
    cfg = Config(name="tiny")
    update(cfg, raw)
    distill.train(cfg)
    return out / "tiny"


def test_training_curves_png_written_when_training_ends(tiny_run):
    pytest.importorskip("matplotlib")
    for run in (tiny_run, tiny_run.parent / "tiny-teacher"):  # the student and the teacher stage
        png = run / "training_curves.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_run_writes_json_and_png(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis"
    assert cli(["analyze", str(tiny_run), "--out", str(out), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DeiT Sec. 4: 0.06" in printed and "DeiT Sec. 4: 0.93" in printed and "teacher" in printed
    assert saved["num_images"] == 16 and saved["agreement"]["names"] == ["cls", "dist", "joint", "teacher"]
    assert saved["confusion"]["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert [layer["name"] for layer in saved["token_cosine"]["layers"]] == ["input", "block 1", "block 2", "norm (heads)"]
    # The same run, the same numbers as `distill eval` (one loader of the run's validation split).
    from distill import evaluate_run
    metrics = evaluate_run(str(tiny_run), num_workers=0)
    assert saved["top1"]["cls"] == metrics["cls_top1"] and saved["top1"]["teacher"] == metrics["teacher_top1"]
    assert saved["top1"]["joint_softmax"] == metrics["joint_softmax_top1"]
    assert saved["agreement"]["top1"][2][3] == metrics["agreement_top1"]


def test_without_matplotlib_json_is_still_written_with_a_one_line_note(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import ...` fails
    result = analyze_run(tiny_run, out=tmp_path, num_workers=0)
    assert (tmp_path / "analysis.json").is_file() and not (tmp_path / "analysis.png").exists()
    assert result["files"]["png"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install deit-distill[plots]" in err[0]


def test_analyze_bad_path_is_one_line_error(capsys):
    assert cli(["analyze", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "runs/<name>" in err
