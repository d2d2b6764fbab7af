"""The data layer at scale: scan cost, latent-cache reads and memory, measured in one run.

    .venv/bin/python bench/bench_cache.py [--images 100000] [--small 2000] [--large 20000]
    .venv/bin/python bench/bench_cache.py --quick      # every row, small

Generates --images tiny PNGs with captions in a temporary folder (nested: the first --small,
then up to --large, then the rest), then prints:

- scan: `load_dataset` over all of them in a fresh process: seconds, and peak RSS above the
  process's RSS before the scan, per image;
- cache reads: batches/s of `DiskLatentCache.latents` (the trainer's read path: CRC-checked
  entries, stacked) over a warm cache of 512 px entries, next to `safetensors.torch.load_file`
  of the same files stacked the same way (target: at least 80%);
- run memory: peak RSS of a training run (train.py's building code and loop, tiny-sd15, 64 px,
  batch 8, --steps optimizer steps) over a warm disk cache of --large images, next to the same
  run over --small images (target: within 10%). A first run over --large images fills the cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from data import DataSettings, load_dataset
from training.disk_cache import DiskLatentCache, entry_path, write_entry

LATENT_512 = (4, 64, 64)
BATCH = 8


def make_images(root: Path, count: int, small: int, large: int) -> None:
    """``count`` 8x8 PNGs with a caption each: ``root/ab/a`` (the first ``small``),
    ``root/ab/b`` (up to ``large``), ``root/c`` (the rest); 1,000 per folder."""
    pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()
    for n in range(count):
        part = "ab/a" if n < small else "ab/b" if n < large else "c"
        folder = root / part / f"{n // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels[0, 0] = (n % 256, (n // 256) % 256, n // 65536)  # every file different
        Image.fromarray(pixels).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(f"a photo number {n}, tag{n % 7}")


def settings(root: Path) -> DataSettings:
    return DataSettings(
        data_root=root,
        resolution=512,
        batch_size=BATCH,
        seed=1,
        flip_p=0.0,
        cond_dropout=0.0,
        shuffle_tags=False,
        keep_tags=0,
        dataloader_num_workers=0,
    )


def rss_kib() -> int:
    """This process's resident memory now, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child_scan(root: Path) -> dict:
    before = rss_kib()
    started = time.perf_counter()
    dataset = load_dataset(settings(root))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": len(dataset.images), "seconds": seconds, "rss_kib": peak - before}


def warm_cache(root: Path, cache: Path) -> DiskLatentCache:
    """A disk cache whose every entry is there (random latents at each image's key)."""
    dataset = load_dataset(settings(root))
    names = {(image.index, False): f"{image.index:064x}" for image in dataset.images}
    for name in names.values():
        path = entry_path(cache, name)
        if not path.exists():
            write_entry(path, torch.randn(LATENT_512), torch.rand(LATENT_512))
    encoder = SimpleNamespace(device=torch.device("cpu"), shape=lambda key: LATENT_512)
    return DiskLatentCache(dataset, cache, names, encoder)  # type: ignore[arg-type]


def child_run(root: Path, cache: Path, steps: int) -> dict:
    """A training run (train.py's building code and loop on tiny-sd15, 64 px, batch 8) over
    the disk cache of ``root``'s images, stopped after ``steps`` optimizer steps."""
    from bench.trainer_harness import BenchmarkFinished, build_run_from_flags, train_with_hook

    with tempfile.TemporaryDirectory() as logs:
        argv = [
            "--resume_ckpt",
            "tiny-sd15",
            "--data_root",
            str(root),
            "--resolution",
            "64",
            "--batch_size",
            str(BATCH),
            "--max_epochs",
            "100",
            "--flip_p",
            "0",
            "--cache_latents",
            "--latent_cache_dir",
            str(cache),
            "--logdir",
            logs,
            "--dataloader_num_workers",
            "0",
            "--log_step",
            "1000",
        ]
        run, accelerator = build_run_from_flags(argv)
        done = 0

        def hook(ctx: object) -> None:
            nonlocal done
            done += 1
            if done >= steps:
                raise BenchmarkFinished

        train_with_hook(run, accelerator, hook)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": len(run.dataset.images), "steps": done, "peak_kib": peak}


def in_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def read_rates(cache: DiskLatentCache, repeats: int) -> tuple[float, float]:
    """Batches/s of the cache's read path and of plain load_file, best of ``repeats``."""
    keys = list(cache.names)
    batches = [keys[i : i + BATCH] for i in range(0, len(keys) - BATCH + 1, BATCH)]
    plans = [
        SimpleNamespace(image_indices=[k[0] for k in b], flipped=[k[1] for k in b]) for b in batches
    ]

    def ours() -> None:
        for plan in plans:
            cache.latents(plan)  # type: ignore[arg-type]

    def plain() -> None:
        for batch in batches:
            files = [load_file(cache.path(key)) for key in batch]
            torch.stack([f["mean"] for f in files]), torch.stack([f["std"] for f in files])

    best = {ours: float("inf"), plain: float("inf")}
    for _ in range(repeats):
        for reader in (plain, ours):
            started = time.perf_counter()
            reader()
            best[reader] = min(best[reader], time.perf_counter() - started)
    return len(batches) / best[ours], len(batches) / best[plain]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--quick", action="store_true", help="300/20/100 images, 2 repeats")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *paths = args.child
        if what == "scan":
            result = child_scan(Path(paths[0]))
        else:
            result = child_run(Path(paths[0]), Path(paths[1]), int(paths[2]))
        print(json.dumps(result))
        return
    if args.quick:
        args.images, args.small, args.large, args.repeats, args.steps = 300, 20, 100, 2, 3
    with tempfile.TemporaryDirectory() as temporary:
        report(Path(temporary), args)


def report(temporary: Path, args: argparse.Namespace) -> None:
    data, cache = temporary / "data", temporary / "cache"
    make_images(data, args.images, args.small, args.large)
    scan = in_child("scan", str(data))
    ours, plain = read_rates(warm_cache(data / "ab" / "a", cache / "512"), args.repeats)
    steps = str(args.steps)
    in_child("run", str(data / "ab"), str(cache / "runs"), "1")  # encodes every entry
    small = in_child("run", str(data / "ab" / "a"), str(cache / "runs"), steps)
    large = in_child("run", str(data / "ab"), str(cache / "runs"), steps)
    rows = [
        (
            "scan",
            f"{scan['images']:,} images",
            f"{scan['seconds']:.1f} s, "
            f"{scan['seconds'] / scan['images'] * 1e6:.0f} us and "
            f"{scan['rss_kib'] * 1024 / scan['images']:.0f} B RSS per image",
            "-",
        ),
        ("cache reads", "plain load_file", f"{plain:.0f} batches/s of {BATCH}", "1.00"),
        (
            "cache reads",
            "DiskLatentCache",
            f"{ours:.0f} batches/s of {BATCH}",
            f"{ours / plain:.2f} (target >= 0.80)",
        ),
        (
            "run memory",
            f"{small['images']:,} entries",
            f"{small['peak_kib'] / 1024:.0f} MiB peak",
            "1.00",
        ),
        (
            "run memory",
            f"{large['images']:,} entries",
            f"{large['peak_kib'] / 1024:.0f} MiB peak",
            f"{large['peak_kib'] / small['peak_kib']:.2f} (target <= 1.10)",
        ),
    ]
    print("| measure | case | result | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
