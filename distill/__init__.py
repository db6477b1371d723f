"""deit-distill: DeiT-style knowledge distillation.

The Python API the CLI is built on::

    import distill
    cfg = distill.load_recipe("cifar10_deit_tiny", ["train.epochs=10"])
    distill.train(cfg)                       # distil (fine-tunes the teacher first if the recipe asks)
    distill.train_teacher(cfg)               # only the teacher stage
    distill.evaluate_run("runs/cifar10_deit_tiny")
    distill.export_student("runs/cifar10_deit_tiny", "timm")   # or "hf": a folder timm/transformers loads
    distill.analyze_run("runs/cifar10_deit_tiny")   # DeiT Sec. 4: token cosines, head agreement, confusion
    distill.predict("runs/cifar10_deit_tiny", "photo.jpg")     # top-5 classes; also an ONNX export (--format onnx)
    distill.report_runs(["runs/cifar10_deit_tiny"])           # params, GFLOPs, speed, accuracy vs the teacher
"""
from distill.config import Config, ConfigError, load_recipe, list_recipes
from distill.losses import DistillationLoss
from distill.train import train, train_teacher
from distill.evaluate import evaluate, evaluate_run
from distill.export import ExportError, export_student
from distill.analyze import analyze_run
from distill.predict import predict
from distill.report import report_runs

__all__ = ["Config", "ConfigError", "load_recipe", "list_recipes", "DistillationLoss", "train",
           "train_teacher", "evaluate", "evaluate_run", "export_student", "ExportError", "analyze_run",
           "predict", "report_runs"]
