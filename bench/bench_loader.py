"""Loader throughput: images/s of `data.make_loader` against a plain PIL loop, in one run.

    .venv/bin/python bench/bench_loader.py [--images 96] [--resolution 512] [--batch-size 4]

Generates N JPEGs of about one megapixel (three aspect ratios) in a temporary folder, scans them
once with `load_dataset`, then times, after one untimed warm-up pass of the plain loop (so every
row reads the files from the page cache):

- "PIL open+resize": Image.open → convert("RGB") → resize to the image's bucket (Lanczos), one
  image after another in this process; the baseline;
- "make_loader, W workers": the trainer's loader (EXIF, RGB, JPEG draft decoding, cover-resize,
  crop, flip, float tensor in [-1, 1], batched), for each W of --workers.

Each row is the best of --repeats runs. Prints a table with images/s and the ratio to the
baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from data import DataSettings, load_dataset, make_loader

# About one megapixel each: square, landscape 3:2-ish, portrait.
SIZES = [(1024, 1024), (1216, 832), (832, 1216)]
JPEG_QUALITY = 90


def make_images(folder: Path, count: int) -> None:
    """Smooth colour waves with noise (compresses like a photo, ~300 KB each). One base picture
    per size, rolled and tinted per image: different files, cheap to make."""
    rng = np.random.default_rng(0)
    bases = {}
    for width, height in SIZES:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        waves = [127 + 100 * np.sin(x / (90 + 30 * c) + y / (140 - 20 * c)) for c in range(3)]
        noise = rng.normal(0, 12, size=(height, width, 3))
        bases[(width, height)] = np.stack(waves, axis=-1) + noise
    for k in range(count):
        base = bases[SIZES[k % len(SIZES)]]
        tint = rng.uniform(-40, 40, size=3)
        pixels = np.roll(base, shift=(17 * k, 29 * k), axis=(0, 1)) + tint
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"photo {k:04d}_.jpg", quality=JPEG_QUALITY)


def time_pil_loop(paths_and_buckets: list[tuple[Path, tuple[int, int]]]) -> float:
    started = time.perf_counter()
    for path, bucket in paths_and_buckets:
        with Image.open(path) as image:
            image.convert("RGB").resize(bucket, Image.Resampling.LANCZOS)
    return time.perf_counter() - started


def time_loader(settings: DataSettings) -> tuple[float, int]:
    """Seconds for one epoch of make_loader (worker start-up included) and the images it gave."""
    dataset = load_dataset(settings)
    started = time.perf_counter()
    count = sum(len(batch.paths) for batch in make_loader(dataset, epoch=0))
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as folder:
        root = Path(folder)
        started = time.perf_counter()
        make_images(root, args.images)
        made = time.perf_counter() - started
        settings = DataSettings(
            data_root=root,
            resolution=args.resolution,
            batch_size=args.batch_size,
            seed=0,
            flip_p=0.5,
            cond_dropout=0.0,
            shuffle_tags=False,
            keep_tags=0,
            dataloader_num_workers=0,
        )
        started = time.perf_counter()
        dataset = load_dataset(settings)
        scanned = time.perf_counter() - started
        work = [(image.path, image.bucket) for image in dataset.images]
        time_pil_loop(work)  # warm-up: page cache, Pillow's codecs
        baseline = min(time_pil_loop(work) for _ in range(args.repeats))
        rows = [("PIL open+resize (baseline)", len(work), baseline)]
        for workers in args.workers:
            changed = DataSettings(**{**settings.__dict__, "dataloader_num_workers": workers})
            seconds, count = min(time_loader(changed) for _ in range(args.repeats))
            rows.append((f"make_loader, {workers} workers", count, seconds))

    megapixels = sum(w * h for w, h in SIZES) / len(SIZES) / 1e6
    print(
        f"{args.images} JPEGs of ~{megapixels:.2f} MP (made in {made:.1f} s), resolution "
        f"{args.resolution}, batch {args.batch_size}, best of {args.repeats}; scan (headers + "
        f"1/8-scale verify decode): {scanned:.2f} s = {args.images / scanned:.0f} images/s"
    )
    base_rate = len(work) / baseline
    print(f"{'method':<30} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs PIL':>7}")
    for name, count, seconds in rows:
        rate = count / seconds
        print(f"{name:<30} {count:>7} {seconds:>8.2f} {rate:>9.1f} {rate / base_rate:>6.2f}x")


if __name__ == "__main__":
    main()
