"""``distill cache-teacher``: build the replay cache of a recipe's teacher (``distill.cache`` is its
format and how training reads it), and ``--check`` it.

``build_cache`` walks the very batches training will see, in the same replayable layout
(``distill.replay``), runs the teacher once per batch and writes each epoch's arrays, sealed by their
checksums; completed epochs are kept, so an interrupted build continues and a larger
``train.epochs`` extends a cache. ``check_cache`` verifies every file, then replays a sample of
batches from their seeds, compares the images bit for bit, reruns the teacher and measures what the
top-K choice costs soft distillation on those batches.
"""
from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from distill import atomic, build, collective, lock
from distill.cache import (ARRAYS, CACHE_FILE, FORMAT, VAL_DIR, VAL_FILE, CacheError, TeacherCache, classes_dtype,
                           default_dir, describe_value, epoch_arrays, epoch_dir, first_mismatch, image_digest, made_from,
                           open_cache, read_info, seal, teacher_weights_sha256, top_k_entries, top_k_fidelity)
from distill.config import Config, ConfigError
from distill.pipeline import epoch_batches, image_dataset, replay_mixup, train_loader, val_loader
from distill.recipes import dump, validate
from distill.replay import ReplayBatchSampler


def build_cache(cfg: Config, out: str | Path | None = None) -> Path:
    """``distill cache-teacher``: run the teacher over every epoch's batches and store its outputs.

    Completed epochs are kept, so an interrupted build continues, and a larger ``train.epochs``
    extends a cache. Every process builds the global batches ``b % processes == rank``.
    """
    validate(cfg)
    if cfg.teacher.name is None:
        raise ConfigError("cache-teacher needs teacher.name (see `distill teachers`)")
    root = Path(out or cfg.teacher.cache or default_dir(cfg))
    # One builder per cache folder (distill.lock); a training run reading it needs no lock: it reads
    # only sealed epochs, which appear whole (renamed into place).
    with lock.hold(root, "teacher cache", "wait for it to finish, or set teacher.cache=<another folder>"):
        return _build_cache(cfg, root)


def _build_cache(cfg: Config, root: Path) -> Path:
    data = build.load_data(cfg.data)
    cfg = build.with_teacher_weights(cfg)
    teacher = build.build_teacher(cfg, data.num_classes, class_names=data.class_names)
    tc = cfg.train
    precision = build.run_precision(tc.mixed_precision, cpu=tc.cpu, warn=True)
    accelerator = build.new_accelerator(cpu=tc.cpu or build.multi_process_cpu(), mixed_precision=precision,
                                        kwargs_handlers=collective.process_group_kwargs(tc.collective_timeout_s))
    torch.set_num_threads(build.compute_threads(tc.threads))
    # Another process that dies or freezes ends this one within train.collective_timeout_s, with one line.
    with collective.guard(accelerator, tc.collective_timeout_s, lambda: _kept(root, tc.epochs)):
        return _fill_cache(cfg, data, teacher, accelerator, root, precision)


def cache_size(cfg: Config, data) -> int:
    """Bytes ``build_cache`` writes for ``cfg`` on ``data`` (``distill plan``): every epoch's arrays with
    their ``.npy`` headers and checksums, the validation top-5, ``cache.json`` and ``recipe.yaml``."""
    tc, C = cfg.train, data.num_classes
    nb, B, K = len(data.train) // tc.batch_size, tc.batch_size, min(cfg.teacher.cache_topk, C)
    layout = epoch_arrays(nb, B, K, C, cfg.teacher.cache_dtype)  # what _fill_cache writes
    epoch = _sealed_bytes({f"{name}.npy": _npy_bytes(*spec) for name, spec in layout.items()})
    val = _sealed_bytes({VAL_FILE: _npy_bytes((len(data.val), min(5, C)), classes_dtype(C))})
    # What _fill_cache records: the config with the teacher's weights named, their hash (64 hex digits)
    # when they are on this machine.
    written = copy.deepcopy(cfg)
    checkpoint = build.teacher_checkpoint(cfg)
    if checkpoint is not None:
        written.teacher.checkpoint, written.teacher.pretrained = checkpoint, False
    sha = "0" * 64 if checkpoint is not None and Path(checkpoint).is_file() else None
    info = _cache_json(made_from(written, data, sha), K, nb, B, C, build.run_precision(tc.mixed_precision, cpu=tc.cpu),
                       cfg.teacher.cache_dtype, epochs=tc.epochs)
    records = len((json.dumps(info, indent=1) + "\n").encode()) + len(dump(written).encode())
    return tc.epochs * epoch + val + records


def _npy_bytes(shape: tuple[int, ...], dtype) -> int:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return len(header.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


def _sealed_bytes(files: dict[str, int]) -> int:
    """The files' sizes plus the checksums.json that ``seal`` writes for them."""
    sums = {name: {"size": size, "sha256": "0" * 64} for name, size in sorted(files.items())}
    return sum(files.values()) + len(json.dumps(sums, indent=1) + "\n")


def _kept(root: Path, epochs: int) -> tuple[str, Path, bool]:
    """The cache's complete epochs: the words of the one line, the folder, and False (a build continues
    by itself, with no --resume)."""
    done = sum(epoch_dir(root, epoch).is_dir() for epoch in range(epochs))
    return f"{done} of {epochs} cache epochs in {root} are complete", root, False


def _fill_cache(cfg: Config, data, teacher, accelerator, root: Path, precision: str) -> Path:
    """``build_cache`` once the Accelerator (and so the process group) exists."""
    tc, dc = cfg.train, cfg.data
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    record = made_from(cfg, data, teacher_weights_sha256(cfg))
    K = min(cfg.teacher.cache_topk, data.num_classes)
    train_set = image_dataset(dc, data, train=True)
    sampler = ReplayBatchSampler(len(train_set), tc.batch_size, tc.seed, num_repeats=dc.num_repeats if dc.repeated_aug else 1)
    nb, B = sampler.num_batches, tc.batch_size
    if nb == 0:
        raise ConfigError(f"train.batch_size={B} is larger than the {len(train_set)} training images; lower it")
    if main:
        _start_cache_file(root, record, K, nb, B, data.num_classes, precision, cfg.teacher.cache_dtype)
    accelerator.wait_for_everyone()

    teacher.to(accelerator.device)
    loader, rank_sampler = train_loader(dc, train_set, batch_size=B, seed=tc.seed, num_replicas=world, rank=rank)
    rank_sampler.drop_uneven = False  # every global batch is cached, whichever rank will train on it
    mixup = replay_mixup(dc, smoothing=cfg.optim.smoothing, num_classes=data.num_classes, seed=tc.seed)
    layout = epoch_arrays(nb, B, K, data.num_classes, cfg.teacher.cache_dtype)
    for epoch in range(tc.epochs):
        final = epoch_dir(root, epoch)
        tmp = atomic.staging(final)
        if final.is_dir():
            continue
        if main:
            atomic.fresh_staging(final)
            for name, (shape, dtype) in layout.items():
                np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        accelerator.wait_for_everyone()
        arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in ARRAYS}
        for batch, images, _ in epoch_batches(loader, rank_sampler, mixup, epoch, accelerator.device):
            index, seed = sampler.global_batch(epoch, batch)
            with torch.inference_mode(), accelerator.autocast():
                logits = teacher(images).float()
            values, classes, lse = top_k_entries(logits, K)
            arrays["index"][batch], arrays["seed"][batch] = index, seed
            arrays["values"][batch], arrays["classes"][batch], arrays["lse"][batch] = values, classes, lse  # cast by numpy
            arrays["digest"][batch] = np.frombuffer(image_digest(images), dtype=np.uint8)
        for array in arrays.values():
            array.flush()
        del arrays
        accelerator.wait_for_everyone()
        if main:
            seal(tmp)
            atomic.commit(final)
            accelerator.print(f"cached epoch {epoch + 1}/{tc.epochs} in {final}")
    if main and not (root / VAL_DIR).is_dir():
        _cache_val_predictions(cfg, data, teacher, accelerator, root)
    if main:
        info = json.loads((root / CACHE_FILE).read_text())
        info["epochs"] = max(info.get("epochs", 0), tc.epochs)
        atomic.write_json(root / CACHE_FILE, info)
        atomic.write_text(root / "recipe.yaml", dump(cfg))
    accelerator.wait_for_everyone()
    return root


def _start_cache_file(root: Path, record: dict, K: int, nb: int, B: int, num_classes: int, precision: str,
                      value_dtype: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    file = root / CACHE_FILE
    if file.is_file():
        info = read_info(root)
        key = first_mismatch(info["made_from"], record)
        stored = info["value_dtype"]
        if key is not None or info["topk"] != K or stored != value_dtype:
            what = f"{key}: {describe_value(key, info['made_from'][key])} there, {describe_value(key, record.get(key))} " \
                   "in this recipe" if key else f"top-{info['topk']} there, top-{K} asked" if info["topk"] != K \
                   else f"{stored} values there, teacher.cache_dtype={value_dtype} asked"
            raise CacheError(f"{root} holds a teacher cache of another recipe ({what}); set teacher.cache=<new folder>")
        return
    if any(root.iterdir()):
        raise CacheError(f"{root} is not empty and holds no teacher cache; set teacher.cache=<new folder>")
    atomic.write_json(file, _cache_json(record, K, nb, B, num_classes, precision, value_dtype, epochs=0))


def _cache_json(record: dict, K: int, nb: int, B: int, num_classes: int, precision: str, value_dtype: str, *,
                epochs: int) -> dict:
    """The contents of ``cache.json`` (``distill.cache.read_info`` reads it; ``cache_size`` measures it)."""
    return {"format": FORMAT, "made_from": record, "epochs": epochs, "topk": K, "num_batches": nb, "batch_size": B,
            "num_classes": num_classes, "mixed_precision": precision, "value_dtype": value_dtype}


def _cache_val_predictions(cfg, data, teacher, accelerator, root: Path) -> None:
    k = min(5, data.num_classes)
    preds = np.zeros((len(data.val), k), dtype=classes_dtype(data.num_classes))
    loader = val_loader(cfg.data, image_dataset(cfg.data, data, train=False), cfg.train.batch_size)
    for images, _, index in loader:
        with torch.inference_mode(), accelerator.autocast():
            preds[index.numpy()] = teacher(images.to(accelerator.device)).float().topk(k, dim=1).indices.cpu().numpy()
    def write(folder: Path) -> None:
        np.save(folder / VAL_FILE, preds)
        seal(folder)

    atomic.write_dir(root / VAL_DIR, write)


def check_cache(cfg: Config, batches: int = 4) -> dict:
    """``cache-teacher --check``: replay ``batches`` cached batches (spread over the epochs) from their
    seeds, compare the images bit for bit with the cached digests, rerun the teacher and report the
    largest difference from the cached logits."""
    validate(cfg)
    root = Path(cfg.teacher.cache or default_dir(cfg))
    cache = TeacherCache(root)
    data = build.load_data(cfg.data)
    cfg.teacher.cache = str(root)
    open_cache(cfg, data)
    epochs = [e for e in range(cache.info["epochs"]) if epoch_dir(root, e).is_dir()]
    cache.check(epochs)  # every file against its checksum, before anything is replayed
    cfg = build.with_teacher_weights(cfg)
    teacher = build.build_teacher(cfg, data.num_classes, class_names=data.class_names)
    accelerator = build.new_accelerator(cpu=cfg.train.cpu, mixed_precision=cache.info["mixed_precision"])
    teacher.to(accelerator.device)
    dataset = image_dataset(cfg.data, data, train=True)
    mixup = replay_mixup(cfg.data, smoothing=cfg.optim.smoothing, num_classes=data.num_classes, seed=cfg.train.seed)
    picks = np.random.default_rng(0).choice(len(epochs) * cache.info["num_batches"], size=min(batches, len(epochs) * cache.info["num_batches"]), replace=False)
    identical, max_diff, agree, total, rerun = True, 0.0, 0, 0, []
    for pick in sorted(int(p) for p in picks):
        epoch, batch = epochs[pick // cache.info["num_batches"]], pick % cache.info["num_batches"]
        images, targets = replay_batch(dataset, cache, mixup, epoch, batch)
        a = cache.arrays(epoch)
        identical &= image_digest(images) == bytes(np.asarray(a["digest"][batch]))
        with torch.inference_mode(), accelerator.autocast():
            logits = teacher(images.to(accelerator.device)).float().cpu()
        classes = torch.from_numpy(a["classes"][batch].astype(np.int64))
        stored = torch.from_numpy(np.array(a["values"][batch], dtype=np.float32))
        max_diff = max(max_diff, float((logits.gather(1, classes) - stored).abs().max()))
        agree += int((logits.argmax(1) == classes[:, 0]).sum())
        total += len(classes)
        rerun.append(logits)
    # What keeping the top K (in the cache's dtype) costs soft distillation, on the teacher's real outputs.
    fidelity = top_k_fidelity(torch.cat(rerun), cache.topk, cache.value_dtype, cfg.distill.tau, cfg.distill.soft_norm) \
        if rerun else {}
    return {"epochs_verified": len(epochs), "batches": len(picks), "images_identical": bool(identical),
            "max_abs_logit_diff": max_diff, "top1_agreement": round(100.0 * agree / max(1, total), 2),
            **{f"top{cache.topk}_{key}": value for key, value in fidelity.items()}}


def replay_batch(dataset, cache: TeacherCache, mixup, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a cached batch rebuilt from its stored indices and seeds, without a DataLoader."""
    a = cache.arrays(epoch)
    items = [dataset[(int(i), int(s))] for i, s in zip(a["index"][batch], a["seed"][batch])]
    images = torch.stack([x for x, _ in items])
    targets = torch.tensor([y for _, y in items])
    if mixup is not None:
        images, targets = mixup(images, targets, epoch, batch)
    return images, targets

