"""An ImageNet-shaped dataset on demand: 1,000 classes of JPEGs sized like ImageNet's, in the Hub's layout.

What it imitates is what the input pipeline and the cache pay for, not what a model learns:

* the layout of ``ILSVRC/imagenet-1k`` on the Hub: ``data/{train,validation}-NNNNN-of-NNNNN.parquet`` with
  an ``image`` column of encoded JPEG bytes and a ``label`` class-label column, and a README whose YAML
  names the splits and the 1,000 classes, so ``datasets.load_dataset(<folder>)`` reads it exactly as it
  reads a downloaded ImageNet, through the same loaders (``distill.sources``);
* the image sizes: most ImageNet images were stored with their long side at 500 px, in 4:3 or 3:4, with
  a tail of smaller and squarer ones, about 400x350 px on average; here the long side is 500 px for 70 % of images and uniform in [160, 500) otherwise, the aspect ratio
  is one of 4:3, 3:4, 1:1, 3:2, 2:3, 16:9 with weights 50/15/10/12/8/5 %;
* JPEG quality 90 and content with smooth colour fields, a mid-frequency pattern and grain, the grain
  strong enough that an image weighs about 100 KB: ImageNet-1k's training archive is 138 GB for 1.28M
  images, about 108 KB each, and what a decoder costs grows with the bytes it entropy-decodes.

Every image is a function of (seed, split, index): the same command writes the same bytes.

    python benchmarks/imagenet_like.py --out data/imagenet-like                # 3,000 train + 1,000 val
    python benchmarks/imagenet_like.py --out /tmp/in --train-per-class 1 --val-per-class 0 --classes 10

It prints the set's statistics (images, mean size, mean bytes) and writes them to ``<out>/stats.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

ASPECTS = ((4 / 3, 0.50), (3 / 4, 0.15), (1.0, 0.10), (3 / 2, 0.12), (2 / 3, 0.08), (16 / 9, 0.05))
SHARD_IMAGES = 1000  # images per parquet shard (ImageNet's shards hold about 1,000 too)
SPLIT_WORDS = {"train": 0, "validation": 1}


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like ImageNet's (see the module docstring)."""
    long_side = 500 if rng.random() < 0.7 else int(rng.integers(160, 500))
    ratios, weights = zip(*ASPECTS)
    ratio = ratios[int(rng.choice(len(ratios), p=np.asarray(weights) / sum(weights)))]
    if ratio >= 1:
        return long_side, max(1, round(long_side / ratio))
    return max(1, round(long_side * ratio)), long_side


def image_bytes(seed: int, split: str, index: int, label: int, quality: int = 90, mark: float = 1.0) -> bytes:
    """One JPEG: a smooth colour field (upsampled noise, the low frequencies of a photograph), a
    class-specific disc (``mark`` scales its brightness: 3 makes the classes easy to learn), and fine
    texture; deterministic in (seed, split, index)."""
    from PIL import Image

    rng = np.random.default_rng([seed, SPLIT_WORDS[split], index])
    w, h = image_size(rng)
    coarse = rng.integers(0, 256, (rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    mid = rng.normal(0, 1, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    mid = np.asarray(Image.fromarray(np.clip(128 + 40 * mid, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                     dtype=np.float32) - 128
    # The class shows as a bright disc at a place and hue that depend on the label only.
    cls = np.random.default_rng([seed, 7, label])
    cy, cx, r = cls.uniform(0.2, 0.8) * h, cls.uniform(0.2, 0.8) * w, cls.uniform(0.1, 0.3) * min(w, h)
    yy, xx = np.ogrid[:h, :w]
    disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None] * (mark * cls.uniform(40, 90, 3)).astype(np.float32)
    fine = rng.normal(0, 36, (h, w, 3)).astype(np.float32)
    pixels = np.clip(field + mid + disc + fine, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def class_names(classes: int) -> list[str]:
    return [f"class_{c:04d}" for c in range(classes)]


def write_dataset(out: str | Path, *, classes: int = 1000, train_per_class: int = 3, val_per_class: int = 1,
                  seed: int = 0, quality: int = 90, mark: float = 1.0) -> dict:
    """Write the dataset into ``out`` (created; must be empty or absent) and return its statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; pick a new --out")
    (out / "data").mkdir(parents=True, exist_ok=True)
    stats = {"classes": classes, "seed": seed, "jpeg_quality": quality, "mark": mark, "splits": {}}
    for split, per_class in (("train", train_per_class), ("validation", val_per_class)):
        n = classes * per_class
        if n == 0:
            continue
        labels = np.arange(n) % classes  # class-balanced, classes interleaved as in a shuffled shard
        shards = max(1, -(-n // SHARD_IMAGES))
        sizes, nbytes = [], 0
        for s in range(shards):
            rows = range(s * n // shards, (s + 1) * n // shards)
            images = []
            for i in rows:
                data = image_bytes(seed, split, i, int(labels[i]), quality, mark)
                images.append({"bytes": data, "path": f"{split}_{i:07d}.jpg"})
                nbytes += len(data)
                sizes.append(_jpeg_size(data))
            table = pa.table({"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                              "label": pa.array(labels[rows.start:rows.stop], type=pa.int64())})
            pq.write_table(table, out / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet")
        sizes = np.asarray(sizes, dtype=np.float64)
        stats["splits"][split] = {"images": n, "mean_width": round(float(sizes[:, 0].mean()), 1),
                                  "mean_height": round(float(sizes[:, 1].mean()), 1),
                                  "mean_kb": round(nbytes / n / 1000, 1), "bytes_per_pixel": round(nbytes / float((sizes[:, 0] * sizes[:, 1]).sum()), 3)}
    (out / "README.md").write_text(_readme(classes, list(stats["splits"])))
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _jpeg_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _readme(classes: int, splits: list[str]) -> str:
    """The dataset card's YAML, as ``ILSVRC/imagenet-1k`` lays it out (what ``load_dataset`` reads)."""
    files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits)
    names = "\n".join(f"          '{c}': {name}" for c, name in enumerate(class_names(classes)))
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}\n  default: true\ndataset_info:\n"
            f"  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n      class_label:\n"
            f"        names:\n{names}\n---\n# ImageNet-shaped synthetic images\n\nWritten by "
            "`benchmarks/imagenet_like.py`: JPEGs sized like ImageNet's, for timing the input pipeline and the "
            "teacher cache. The pictures carry no meaning beyond a class-specific disc.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=3)
    p.add_argument("--val-per-class", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (ImageNet's files are about 90)")
    p.add_argument("--mark", type=float, default=1.0, help="brightness of the class-specific disc (3: easy to learn)")
    args = p.parse_args(argv)
    stats = write_dataset(args.out, classes=args.classes, train_per_class=args.train_per_class,
                          val_per_class=args.val_per_class, seed=args.seed, quality=args.quality, mark=args.mark)
    print(f"{'split':<12} {'images':>7} {'mean size':>12} {'mean KB':>8} {'bytes/px':>9}")
    for split, s in stats["splits"].items():
        print(f"{split:<12} {s['images']:>7} {s['mean_width']:>5.0f} x {s['mean_height']:<5.0f} {s['mean_kb']:>8} "
              f"{s['bytes_per_pixel']:>9}")
    print(f"wrote {args.out} (load it with datasets.load_dataset('{args.out}') or data.source={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
