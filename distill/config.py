"""The config schema: typed dataclasses whose docstrings and field comments are the documentation.

Recipes (YAML files) and dotted command-line overrides set these fields through ``distill.recipes``,
which checks every key and value on the way in (``update``) and a whole config before any work
(``validate``): unknown keys and values of the wrong type are one-line errors that name the closest
valid key, and the ``Range`` of a number is part of its type here.
Defaults are DeiT's ImageNet recipe (Touvron et al. 2021, Table 9 and the official main.py) unless a
comment says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from distill.errors import DistillError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(DistillError, ValueError):
    """A recipe or override that does not fit the schema; the message names the closest valid key."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number in the schema (``Annotated[int, Range(min=1)]``), checked after its type,
    so that a value that cannot give a meaningful run (0 epochs, alpha 2) is refused before any work."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def contains(self, v: float) -> bool:
        return ((self.min is None or (v > self.min if self.min_open else v >= self.min))
                and (self.max is None or (v < self.max if self.max_open else v <= self.max)))

    def __str__(self) -> str:
        low = None if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        high = None if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
        return " and ".join(x for x in (low, high) if x)


PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(min=0, min_open=True)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Probability = Annotated[float, Range(0, 1)]
Smoothing = Annotated[float, Range(0, 1, max_open=True)]


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    source: str = "uoft-cs/cifar10"
    """Hub id, local dataset folder, image folder, parquet file, or a built-in (`digits`)."""
    image_column: str | None = None
    """Image column; None detects `image`/`img`/the only Image feature."""
    label_column: str | None = None
    """Label column; None detects `label`/`labels`/`fine_label`/the only ClassLabel."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str | None = None
    """None: `validation`, else `val`, else `test`, else carve `val_fraction` of train."""
    val_fraction: Annotated[float, Range(0, 1, min_open=True, max_open=True)] = 0.1
    """Fraction of train held out when the dataset has no validation split."""
    hold_out: bool = False
    """Validate on `val_fraction` of train (held out with `split_seed`) even when the source has a
    validation or test split: settings chosen this way never saw the test set."""
    split_seed: NonNegativeInt = 0
    """Seed for carving a validation split and for the fixed subsets below."""
    train_subset: PositiveInt | None = None
    """Train on a fixed, seeded random subset of this many images (benchmarks)."""
    train_per_class: PositiveInt | None = None
    """Train on a fixed, seeded random subset of this many images of each class (the teacher stage too);
    applied before train_subset. Few images per class is DeiT's regime: a data-starved transformer."""
    val_subset: PositiveInt | None = None
    """Evaluate on a fixed, seeded random subset of this many images."""
    img_size: PositiveInt = 224
    """Student input resolution (square)."""
    transform: Literal["deit", "small"] = "deit"
    """`deit`: RandomResizedCrop + RandAugment + erasing (DeiT Table 9); `small`: crop-with-padding for 32x32 data."""
    crop_pct: Annotated[float, Range(0, 1, min_open=True)] = 0.875
    """`deit` eval transform: resize to img_size / crop_pct, then center-crop (DeiT: 0.875; CaiT: 1.0)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalisation mean of the student's input (the teacher converts to its own)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation std of the student's input."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec (DeiT Table 9: RandAugment m9, mstd 0.5); null disables."""
    reprob: Probability = 0.25
    """Random erasing probability (DeiT Table 9)."""
    hflip: Probability = 0.5
    """Horizontal flip probability; 0 for data where mirroring changes the class (digits, text)."""
    crop_padding: NonNegativeInt = 4
    """`small` transform: pixels of padding for the random crop (4 is the CIFAR standard)."""
    mixup: NonNegativeFloat = 0.8
    """Mixup alpha (DeiT Table 9); 0 disables."""
    cutmix: NonNegativeFloat = 1.0
    """CutMix alpha (DeiT Table 9); 0 disables."""
    mixup_prob: Probability = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: Probability = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    """timm/DeiT `--mixup-mode`: one lambda per batch, per pair, or per image."""
    repeated_aug: bool = False
    """DeiT's repeated augmentation (Hoffer et al. 2020): each image 3 times per epoch, sharded."""
    num_repeats: PositiveInt = 3
    """Repeats per image with repeated_aug (DeiT: 3)."""
    num_workers: NonNegativeInt = 2
    """DataLoader worker processes that decode and augment (results do not depend on it)."""
    in_memory: bool | None = None
    """Decode every image once into memory (uint8) and augment from there; null: when the split fits in in_memory_max_mb."""
    in_memory_max_mb: NonNegativeInt = 2048
    """Largest decoded split (MB) that in_memory=null keeps in memory (CIFAR-10 train: 150 MB)."""


@dataclass
class StudentConfig:
    """The vision-transformer student (see `distill students`)."""

    name: str = "deit_tiny"
    """Registered student (`distill students`)."""
    patch_size: PositiveInt | None = None
    """None keeps the architecture's default."""
    drop_path: Smoothing = 0.1
    """Stochastic depth rate (DeiT Table 9: 0.1)."""
    checkpoint: str | None = None
    """Initial weights (safetensors, torch state dict, or an export folder such as runs/<x>/export), e.g. timm
    DeiT weights; another resolution interpolates the position embedding (fine-tuning, DeiT Sec. 6)."""
    pos_embed_antialias: bool = False
    """Resizing pos_embed for another resolution: false = bicubic without antialiasing, as DeiT's main.py
    fine-tunes (F.interpolate, align_corners=False); true = timm's resample_abs_pos_embed default (antialias)."""
    joint: Literal["logits", "softmax"] = "logits"
    """Eval-mode joint head: `logits` averages the two heads' logits (official DeiT code, models.py);
    `softmax` averages their softmax outputs (DeiT paper, Sec. 4 "joint classifiers"). Eval reports both."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra builder arguments, e.g. {depth: 6}."""


@dataclass
class TeacherConfig:
    """The frozen teacher (see `distill teachers`); name null trains without one."""

    name: str | None = "regnety_160"
    """DeiT's teacher is RegNetY-16GF (Touvron et al. 2021, Sec. 5.2)."""
    checkpoint: str | None = None
    """Teacher weights fine-tuned on this dataset (safetensors or torch state dict)."""
    pretrained: bool = False
    """timm's pretrained ImageNet weights (needs network; only right for 1000-class ImageNet)."""
    img_size: PositiveInt | None = None
    """Teacher input resolution (batches are resized to it); None: the resolution recorded in the teacher
    export's teacher.json (a teacher keeps seeing its own resolution when the student fine-tunes at another),
    else the student's."""
    cache: str | None = None
    """Folder of cached teacher outputs (`distill cache-teacher`); training then never runs the teacher."""
    cache_topk: PositiveInt = 10
    """`distill cache-teacher`: top-K teacher logits kept per sample (TinyViT, Wu et al. 2022, keeps 10)."""
    cache_dtype: Literal["float32", "float16"] = "float32"
    """`distill cache-teacher`: how the top-K logits are stored. float16 halves them (at K=1000 most of the
    cache's bytes); hard distillation stays exact, soft targets carry float16's rounding (docs/teachers.md)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra builder arguments, e.g. {pretrained_cfg: deit_in1k} for timm weights."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Teacher forward precision: `auto` follows train.mixed_precision (bf16/fp16 autocast, else fp32)."""
    fold_bn: bool = True
    """Fold BatchNorm into the preceding convolutions (inference only; kept if logits match to 1e-4)."""
    channels_last: bool = True
    """channels_last (NHWC) memory format for convolutional teachers."""
    compile: bool = False
    """torch.compile the teacher network (slow first batches; needs a C compiler on CPU)."""


@dataclass
class TeacherTrainConfig:
    """Fine-tuning (or training) the teacher on the dataset: `distill train-teacher`.

    With `epochs` > 0 and no `teacher.checkpoint`, `distill train` runs this stage first.
    """

    epochs: NonNegativeInt = 0
    """Teacher fine-tuning epochs; 0 skips the stage."""
    opt: Literal["sgd", "adamw"] = "sgd"
    """Optimiser for the teacher (timm's: sgd has Nesterov momentum, the usual CNN choice)."""
    lr: PositiveFloat = 0.05
    """Peak learning rate (after warm-up)."""
    weight_decay: NonNegativeFloat = 5e-4
    """Weight decay for the teacher."""
    momentum: Probability = 0.9
    """SGD momentum."""
    sched: Literal["cosine", "linear"] = "cosine"
    """Learning-rate decay after warm-up: cosine, or linear to 0 (Jordan 2024's short runs)."""
    warmup_epochs: NonNegativeInt = 1
    """Linear warm-up epochs."""
    norm_lr_scale: PositiveFloat = 1.0
    """Learning-rate multiplier for normalisation layers' parameters (not their weight decay, which is
    0): Jordan 2024 trains BatchNorm shifts 64 times faster than the weights."""
    batch_size: PositiveInt = 128
    """Per-process batch size for the teacher stage."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """The teacher stage's precision; null: train.mixed_precision. A CNN's convolutions gain most
    from bf16 (with channels_last) on a CPU, where a ViT student's may not."""
    smoothing: Smoothing = 0.1
    """Label smoothing for the teacher."""
    mixup: bool = False
    """Use the data section's mixup/cutmix for the teacher too."""
    crop_padding: NonNegativeInt | None = None
    """The teacher stage's random-crop padding (transform: small); null: data.crop_padding. Jordan
    2024's short CIFAR runs translate by at most 2 pixels."""
    light_augment: bool = False
    """Train the teacher with crop + flip only (no RandAugment, no erasing): the usual CNN recipe on
    small datasets (He et al. 2016, Sec. 4.2); the student keeps the full DeiT augmentation."""


@dataclass
class DistillConfig:
    """How the teacher's outputs enter the loss (DeiT Sec. 5.2)."""

    kind: Literal["none", "soft", "hard"] = "hard"
    """`none`: labels only; `soft`: KL to the tempered teacher; `hard`: CE to its argmax (DeiT Sec. 5.2)."""
    alpha: Probability = 0.5
    """Total = (1 - alpha) * CE(cls, y) + alpha * distill(dist, teacher)."""
    tau: PositiveFloat = 1.0
    """Soft distillation temperature (DeiT uses 1.0 with the hard kind; 3.0 in its soft ablation)."""
    soft_norm: Literal["deit", "batchmean"] = "deit"
    """KL normalisation: `deit` divides by numel (official code), `batchmean` by batch (timm)."""
    hard_smoothing: Smoothing = 0.0
    """Label smoothing on the teacher's hard label (DeiT: off)."""


@dataclass
class OptimConfig:
    """Optimiser and schedule (DeiT Table 9)."""

    opt: Literal["adamw", "sgd"] = "adamw"
    """Optimiser (timm create_optimizer_v2; no weight decay on norms, biases, tokens; sgd has Nesterov momentum)."""
    lr: PositiveFloat | None = None
    """None: base_lr * global_batch / 512 (DeiT's linear scaling rule)."""
    base_lr: PositiveFloat = 5e-4
    """lr per 512 images of global batch when lr is null."""
    weight_decay: NonNegativeFloat = 0.05
    """Weight decay (DeiT Table 9: 0.05)."""
    momentum: Probability = 0.9
    """SGD momentum (opt: sgd only)."""
    norm_lr_scale: PositiveFloat = 1.0
    """Learning-rate multiplier for normalisation layers' parameters (their weight decay stays 0)."""
    smoothing: Smoothing = 0.1
    """Label smoothing on the ground-truth labels."""
    clip_grad: PositiveFloat | None = None
    """Clip the gradient norm to this value; null disables (DeiT: off)."""
    sched: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up, stepped every update: cosine or linear decay to min_lr,
    or constant."""
    warmup_epochs: NonNegativeFloat = 5
    """Linear warm-up from warmup_lr (DeiT Table 9: 5 epochs)."""
    warmup_lr: NonNegativeFloat = 1e-6
    """Learning rate at the start of warm-up."""
    min_lr: NonNegativeFloat = 1e-5
    """Floor of the cosine schedule."""


@dataclass
class TrainConfig:
    """The run itself."""

    epochs: PositiveInt = 300
    """Training epochs (DeiT Table 9: 300)."""
    batch_size: PositiveInt = 128
    """Per process; global batch = batch_size * processes * grad_accum_steps."""
    grad_accum_steps: PositiveInt = 1
    """Batches accumulated per optimiser step (Accelerate)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Accelerate mixed precision; bf16 also works on CPUs. On a CPU, measure before you pick it: on this
    project's AVX-512 machine bf16 made DeiT-Ti/p4 faster (57 to 74 img/s) but the 96-wide student slower
    (296 to 273): torch's CPU flash-attention backward takes 5x longer in bf16 and outweighs the faster
    matmuls when the model is narrow (benchmarks/bf16_profile.py). On a GPU: bf16."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    seed: NonNegativeInt = 0
    """Seed for weights, data order and augmentation (augmentation is a function of seed, epoch and sample)."""
    output_dir: str = "runs"
    """Folder that holds run folders."""
    run_name: str | None = None
    """Run folder name under output_dir; None uses the recipe name."""
    save_every: PositiveInt = 1
    """Save the full training state every N epochs (and at the end)."""
    eval_every: PositiveInt = 1
    """Evaluate every N epochs (and after the last)."""
    ema: bool = False
    """Keep a timm model EMA of the student and export it too."""
    ema_decay: Probability = 0.99996
    """DeiT's model EMA decay."""
    max_steps_per_epoch: PositiveInt | None = None
    """Cap optimisation steps per epoch (a fixed compute budget for benchmarks)."""
    stop_after: PositiveInt | None = None
    """Stop (resumably) after this many epochs of this invocation, e.g. for preemptible jobs."""
    log_every: PositiveInt = 10
    """Update the progress bar statistics every N batches."""
    progress: bool = True
    """Show a progress bar (loss, lr, images/s)."""
    log_with: str | list[str] | None = None
    """Experiment tracker(s) that get each epoch's metrics through Accelerate: tensorboard (events in
    <run>/tb/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio, or all installed;
    one name or a list. Replaces train.tensorboard (true still works, as log_with: tensorboard)."""
    threads: PositiveInt | None = None
    """CPU compute threads per process (torch.set_num_threads); null: the cores this process may run on
    (os.sched_getaffinity) shared among the processes of this machine."""
    compile: bool = False
    """torch.compile the student for training (timm's --torchcompile; the first steps compile)."""
    collective_timeout_s: PositiveInt = 300
    """Several processes: seconds a process waits for the others at a collective (gradient all-reduce,
    barrier) before the run ends with one line (a process died or froze); also `distill cache-teacher`'s.
    Long enough for rank 0 to write a checkpoint or the cache's validation predictions alone while the
    others wait; short enough that a frozen process does not hold every GPU for torch's 10 (NCCL) or
    30 (gloo) minutes. See docs/reliability.md."""


@dataclass
class Config:
    """A whole recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"
    """Recipe name (the file's stem unless set)."""

    def run_dir(self, suffix: str = "") -> Path:
        """The run folder, ``<train.output_dir>/<train.run_name or name><suffix>`` (``-teacher``: its teacher stage)."""
        return Path(self.train.output_dir) / ((self.train.run_name or self.name) + suffix)
