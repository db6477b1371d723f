"""A replay cache of teacher outputs: run the teacher once, train many students from disk.

TinyViT (Wu et al., ECCV 2022, Sec. 3.1) stores, per image and epoch, the augmentation seed and the
teacher's top-K predictions, then replays the augmentation at training time instead of running the
teacher. Here the same holds for DeiT's token distillation: every random decision of the pipeline is
a function of (seed, epoch, position) (``distill.replay``), so ``distill cache-teacher`` walks the
very batches training will see (Mixup/CutMix included, since DeiT's teacher sees the mixed batch)
and keeps, per sample::

    cache.json              what the cache was made from (teacher + weights hash, augmentation,
                            seed, batch size, dataset fingerprint), epochs, K
    epoch_0000/             one folder per epoch, renamed into place when complete
      index.npy   (NB, B)     dataset index of every slot of every global batch
      seed.npy    (NB, B)     its augmentation seed
      values.npy  (NB, B, K)  the teacher's top-K logits (float32, or float16: teacher.cache_dtype)
      classes.npy (NB, B, K)  their classes (int16)
      lse.npy     (NB, B)     log-sum-exp of all C logits: the mass outside the top K
      digest.npy  (NB, 16)    BLAKE2b of each batch's images as the teacher saw them
      checksums.json          size and SHA-256 of each file above, written last
    val/top5.npy            the teacher's top-5 on the validation split (its accuracy, agreement),
    val/checksums.json      sealed the same way

The cache is a correctness artefact like a checkpoint: a training run verifies each folder it reads
(once per run; about 10 ms for a CIFAR-10 epoch) and ``--check`` verifies them all, so a damaged
file is one line naming it, never a student trained against garbage.

Reading rebuilds logits: the top K exactly, the remaining probability mass spread uniformly over
the other classes (TinyViT's sparse labels). Hard distillation needs only the argmax, so it is
exact; soft distillation is exact when K equals the number of classes.

The layout of global batches does not depend on the number of processes, so a cache built by N
processes (``accelerate launch ... -m distill cache-teacher``) trains M. It does depend on the
per-process batch size, which is recorded and checked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from distill import atomic, build
from distill.checkpoint import describe_file
from distill.config import Config, ConfigError
from distill.weights import load_state_dict_file

FORMAT = 2  # 1 had no checksums: refused, built again
CACHE_FILE = "cache.json"
CHECKSUMS = "checksums.json"
VAL_DIR, VAL_FILE = "val", "top5.npy"
ARRAYS = ("index", "seed", "values", "classes", "lse", "digest")
# Recipe keys whose values change what the teacher sees; a cache made with others is refused.
DATA_KEYS = ("img_size", "transform", "mean", "std", "auto_augment", "reprob", "hflip", "crop_padding", "crop_pct",
             "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "repeated_aug", "num_repeats")


class CacheError(ConfigError):
    """A cache that does not fit the recipe, or is incomplete; one line naming the mismatch."""


def default_dir(cfg: Config) -> Path:
    return cfg.run_dir("-teacher-cache")


def epoch_dir(root: Path, epoch: int) -> Path:
    return root / f"epoch_{epoch:04d}"


def classes_dtype(num_classes: int) -> np.dtype:
    """The dtype of stored class indices: int16 when every class fits (ImageNet's 1000 do)."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def epoch_arrays(num_batches: int, batch_size: int, k: int, num_classes: int,
                 value_dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of one epoch: what ``distill cache-teacher`` writes, and what
    ``distill plan`` projects a cache's size from."""
    nb, B = num_batches, batch_size
    class_dtype = classes_dtype(num_classes)
    return {"index": ((nb, B), np.dtype(np.int64)), "seed": ((nb, B), np.dtype(np.uint64)),
            "values": ((nb, B, k), np.dtype(value_dtype)), "classes": ((nb, B, k), np.dtype(class_dtype)),
            "lse": ((nb, B), np.dtype(np.float32)), "digest": ((nb, 16), np.dtype(np.uint8))}


def top_k_entries(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the cache keeps of a batch of teacher logits: the top ``k`` values and their classes, and
    the log-sum-exp of all of them, from which ``sparse_logits`` rebuilds the probabilities."""
    logits = logits.float()
    top = logits.topk(k, dim=1)
    return top.values.cpu().numpy(), top.indices.cpu().numpy(), torch.logsumexp(logits, dim=1).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# What a cache is made from


def made_from(cfg: Config, data, teacher_sha256: str | None) -> dict:
    """The record that must match between a cache and a recipe that reads it."""
    return {
        "teacher.name": cfg.teacher.name,
        "teacher weights (sha256)": teacher_sha256,
        "teacher.img_size": cfg.teacher.img_size,
        "teacher.kwargs": cfg.teacher.kwargs,
        **{f"data.{k}": _plain(getattr(cfg.data, k)) for k in DATA_KEYS},
        "train.seed": cfg.train.seed,
        "train.batch_size": cfg.train.batch_size,
        "training images": data_fingerprint(data.train, data.image_column, data.label_column, data.class_names),
        "validation images": data_fingerprint(data.val, data.image_column, data.label_column, data.class_names),
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def data_fingerprint(ds, image_column: str, label_column: str, class_names: list[str], probes: int = 64) -> str:
    """SHA-256 of a split's size, classes, every label and the encoded bytes of ``probes`` images
    spread over it: the same rows of the same data give the same fingerprint on any machine."""
    import datasets

    h = hashlib.sha256()
    h.update(json.dumps([len(ds), list(class_names)]).encode())
    labels = ds.select_columns([label_column]).with_format("arrow")[label_column]
    h.update(np.asarray(labels.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for i in np.unique(np.linspace(0, len(ds) - 1, num=min(probes, len(ds))).astype(int)):
        value = raw[int(i)][image_column] or {}
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()
        h.update(data or b"")
    return h.hexdigest()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict (names, dtypes, shapes, values): the same weights in any file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def first_mismatch(recorded: dict, current: dict) -> str | None:
    for key, value in recorded.items():
        if key == "teacher weights (sha256)" and current.get(key) is None:
            continue  # the weights are not on this machine: the cache's record is all there is
        if current.get(key) != value:
            return key
    return None


def describe_value(key: str, value) -> str:
    if key.endswith("images") or "sha256" in key:
        return f"{str(value)[:12]}..." if value else "unknown"
    return f"{value!r}"


def write_epoch(root: Path, epoch: int, arrays: dict[str, np.ndarray]) -> Path:
    """Write one epoch's arrays (``ARRAYS``) in memory into place, sealed: for tools that compute the
    teacher's outputs themselves (``benchmarks/throughput.py``) rather than through ``build_cache``."""
    def write(folder: Path) -> None:
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", arrays[name])
        seal(folder)

    return atomic.write_dir(epoch_dir(root, epoch), write)


def seal(folder: Path) -> None:
    """Record the size and SHA-256 of every array in ``folder`` (read back by ``verify``)."""
    sums = {f.name: describe_file(f) for f in sorted(folder.glob("*.npy"))}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")


def verify(folder: Path) -> None:
    """Check every array of a sealed folder against its checksums; one line naming a damaged file."""
    again = f"delete {folder} and run `distill cache-teacher <recipe>` again (finished epochs are kept)"
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        if not isinstance(sums, dict) or not sums:
            raise ValueError("no files listed")
    except (OSError, ValueError) as e:
        raise CacheError(f"{folder / CHECKSUMS} is missing or damaged ({e}); {again}") from None
    for name, expected in sums.items():
        file = folder / name
        if not file.is_file() or describe_file(file) != expected:
            raise CacheError(f"{file} is damaged (its size or checksum differs from {CHECKSUMS}); {again}")


def image_digest(images: torch.Tensor) -> bytes:
    """16-byte BLAKE2b of a batch of images, bit for bit."""
    return hashlib.blake2b(images.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


def read_info(root: Path) -> dict:
    try:
        info = json.loads((root / CACHE_FILE).read_text())
        version = info.get("format")
    except (OSError, ValueError, AttributeError) as e:
        raise CacheError(f"{root / CACHE_FILE} is not a readable teacher cache ({e}); build one with "
                         "`distill cache-teacher <recipe>`") from None
    if version == 1:
        raise CacheError(f"{root} was built by an earlier deit-distill, without checksums; build it again with "
                         "`distill cache-teacher <recipe> teacher.cache=<new folder>`")
    if version != FORMAT:
        raise CacheError(f"{root / CACHE_FILE} is not a readable teacher cache (format {version}, this version reads "
                         f"{FORMAT}); build one with `distill cache-teacher <recipe>`")
    info.setdefault("value_dtype", "float32")  # caches from before teacher.cache_dtype stored float32
    return info


# ----------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """Read side: ``distill.targets.Targets`` from disk, memory-mapped per epoch. The logits are the
    cached top K exactly, the rest of the probability mass spread evenly."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.info = read_info(self.root)
        self.num_classes, self.topk = self.info["num_classes"], self.info["topk"]
        self.value_dtype = self.info["value_dtype"]
        self._epoch: tuple[int, dict[str, np.ndarray]] | None = None
        self._val: torch.Tensor | None = None
        self._verified: set[int] = set()

    def arrays(self, epoch: int) -> dict[str, np.ndarray]:
        """Epoch ``epoch``'s arrays, memory-mapped; its files are verified the first time it is read."""
        if self._epoch is None or self._epoch[0] != epoch:
            folder = epoch_dir(self.root, epoch)
            if not folder.is_dir():
                raise CacheError(f"{self.root} has no epoch {epoch + 1} (it covers {self.info['epochs']}); extend it with "
                                 "`distill cache-teacher <recipe>` with this train.epochs")
            if epoch not in self._verified:
                verify(folder)
            try:
                arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
            except (OSError, ValueError) as e:
                raise CacheError(f"{folder} is damaged ({e}); delete it and run `distill cache-teacher <recipe>` again") from None
            if epoch not in self._verified:
                self._check_classes(arrays["classes"], folder / "classes.npy")
                self._verified.add(epoch)
            self._epoch = (epoch, arrays)
        return self._epoch[1]

    def _check_classes(self, classes: np.ndarray, file: Path) -> None:
        low, high = (int(classes.min()), int(classes.max())) if classes.size else (0, 0)
        if low < 0 or high >= self.num_classes:
            raise CacheError(f"{file} holds class {low if low < 0 else high}, outside the {self.num_classes} classes of "
                             f"{self.root / CACHE_FILE}; build the cache again with `distill cache-teacher <recipe>`")

    def logits(self, epoch: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        device = images.device  # the images only name the device
        a = self.arrays(epoch)
        values = torch.from_numpy(np.array(a["values"][batch], dtype=np.float32)).to(device)
        classes = torch.from_numpy(a["classes"][batch].astype(np.int64)).to(device)
        lse = torch.from_numpy(np.array(a["lse"][batch])).to(device)
        return rebuild_logits(values, classes, lse, self.num_classes, self.value_dtype)

    def to(self, device) -> "TeacherCache":
        return self  # read from disk, moved per batch

    def check(self, epochs) -> None:
        """Every file of ``epochs`` and of the validation predictions against its checksum (and its
        classes against the cache's)."""
        for epoch in epochs:
            self.arrays(epoch)
        self._val_predictions()

    def _val_predictions(self) -> torch.Tensor:
        """The teacher's top-5 classes for every validation image (its accuracy, the agreement)."""
        if self._val is None:
            folder = self.root / VAL_DIR
            if not folder.is_dir():
                raise CacheError(f"{self.root} has no validation predictions; finish it with `distill cache-teacher <recipe>`")
            verify(folder)
            top5 = np.load(folder / VAL_FILE)
            self._check_classes(top5, folder / VAL_FILE)
            self._val = torch.from_numpy(top5.astype(np.int64))
        return self._val

    def val_top5(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self._val_predictions()[indices].to(images.device)


def sparse_logits(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose softmax puts the teacher's exact probability on each top-K class and spreads the
    remaining mass evenly over the other classes (the top-K set and its probabilities are exact)."""
    B, K = values.shape
    if K >= num_classes:
        return torch.empty(B, num_classes, dtype=values.dtype, device=values.device).scatter_(1, classes, values)
    rest = (1 - torch.exp(values - lse[:, None]).sum(dim=1)).clamp_min(1e-12)
    filler = torch.log(rest / (num_classes - K)) + lse
    return filler[:, None].expand(B, num_classes).clone().scatter_(1, classes, values)


def rounded_sparse_logits(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``sparse_logits`` of values that were stored in float16. Rounding can make the teacher's top two
    logits equal, or (a nearly flat teacher with K < C) lift the spread-out rest to the top value; the
    argmax would then fall on another class than the teacher's. The top-1 is kept strictly largest (by
    one float32 step, far below float16's rounding), so hard distillation stays exact."""
    if values.shape[1] > 1:
        values = values.clone()
        values[:, 0] = torch.maximum(values[:, 0], torch.nextafter(values[:, 1], torch.tensor(float("inf"))))
    logits = sparse_logits(values, classes, lse, num_classes)
    if values.shape[1] < num_classes:
        top = values[:, :1]
        below = torch.nextafter(top, torch.tensor(float("-inf")))
        others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, classes[:, :1], False)
        logits = torch.where(others & (logits >= top), below.expand_as(logits), logits)
    return logits


def rebuild_logits(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, num_classes: int,
                   value_dtype: str) -> torch.Tensor:
    """The logits a cache of ``value_dtype`` values stands for: ``rounded_sparse_logits`` for float16,
    ``sparse_logits`` otherwise."""
    rebuild = rounded_sparse_logits if value_dtype == "float16" else sparse_logits
    return rebuild(values, classes, lse, num_classes)


def top_k_fidelity(logits: torch.Tensor, k: int, value_dtype: str = "float32", tau: float = 1.0,
                   norm: str = "deit") -> dict[str, float]:
    """What a cache of the top ``k`` logits (stored in ``value_dtype``) costs soft distillation on these
    teacher logits: the mean probability mass outside the top ``k``; the soft loss (DeiT's, at ``tau``
    and ``norm``) the rebuilt targets leave to a student whose logits equal the teacher's (0 when the
    cache is exact); and the relative error of the soft loss of an untrained student (uniform logits)."""
    from distill.losses import soft_distillation

    logits = logits.float()
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1)
    values = top.values.to(getattr(torch, value_dtype)).float()
    lse = torch.logsumexp(logits, dim=1)
    rebuilt = rebuild_logits(values, top.indices, lse, logits.shape[1], value_dtype)
    uniform = torch.zeros_like(logits)
    full_loss = float(soft_distillation(uniform, logits, tau, norm))
    return {"mass_outside_top_k": float((1 - torch.exp(top.values - lse[:, None]).sum(1)).clamp_min(0).mean()),
            "soft_loss_floor": float(soft_distillation(logits, rebuilt, tau, norm)),
            "untrained_soft_loss_rel_error": abs(float(soft_distillation(uniform, rebuilt, tau, norm)) - full_loss)
                                             / max(full_loss, 1e-12)}


def open_cache(cfg: Config, data) -> TeacherCache:
    """The cache named by ``teacher.cache``, after checking that it was made from this recipe."""
    cache = TeacherCache(cfg.teacher.cache)
    info = cache.info
    sha = teacher_weights_sha256(cfg)
    if sha is None and cfg.teacher.name is not None and not cfg.teacher.pretrained:
        print(f"note: the teacher's weights are not on this machine; the cache {cache.root} is trusted to come from them")
    record = made_from(cfg, data, sha)
    key = first_mismatch(info["made_from"], record)
    if key is not None:
        raise CacheError(f"teacher cache {cache.root} was made with {key}: {describe_value(key, info['made_from'][key])}, "
                         f"the recipe has {describe_value(key, record.get(key))}; build one for this recipe with "
                         f"`distill cache-teacher <recipe> teacher.cache=<new folder>`")
    if info["epochs"] < cfg.train.epochs:
        raise CacheError(f"teacher cache {cache.root} covers {info['epochs']} epochs, the recipe trains {cfg.train.epochs}; "
                         "extend it with `distill cache-teacher <recipe>`")
    if cfg.distill.kind == "soft" and cache.topk < data.num_classes:
        print(f"note: soft distillation from the top-{cache.topk} of {data.num_classes} classes, the rest spread evenly "
              f"(TinyViT's sparse labels); teacher.cache_topk={data.num_classes} makes it exact")
    if cfg.distill.kind == "soft" and cache.value_dtype == "float16":
        print("note: soft distillation from logits stored in float16 (rounded to about 3 significant digits); "
              "teacher.cache_dtype=float32 keeps them exact")
    return cache


def teacher_weights_sha256(cfg: Config) -> str | None:
    """The hash of the weights file the recipe's teacher loads, when it is on this machine, else None
    (timm's pretrained weights are named by the teacher's name and kwargs)."""
    checkpoint = build.teacher_checkpoint(cfg)
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    return weights_sha256(load_state_dict_file(checkpoint))
