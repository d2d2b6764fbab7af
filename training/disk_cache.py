"""``latent_cache_dir``: the latent cache on disk, shared by runs, resumes and processes.

Each entry is the VAE posterior (mean and standard deviation, scaled, float32) of one image as
trained, flipped or not: one safetensors file named by a SHA-256 key over everything that
decides the latents (`EntryIdentity`): the image file's bytes, its bucket (which decides the
resize and crop), the flip, the plugins' image transforms (their source files), the VAE's
weights and the autocast the VAE runs in. A changed image, VAE or transform gets new keys, so
only its own entries are encoded again; stale files stay until the folder is cleared.

Files live two folders deep (``ab/cd/<key>.safetensors``: 65,536 folders), never in one flat
folder. Each is written to a temporary name and renamed into place, so a reader sees a whole
entry or none, whatever the processes or a crash do. Each holds a CRC-32 of its tensors'
bytes: a truncated file is found when the cache is opened (its size is wrong) and encoded
again with the others; a damaged one is found when it is read, re-encoded with a warning and
never trained on.

Training reads each batch's entries from disk (the operating system's page cache keeps the hot
ones), so the process's memory does not grow with the dataset: it keeps one path per entry.
Entries are encoded in the same batches as the memory cache (`encoding_chunks`), so a run over
a warm cache trains bit for bit as a run with ``cache_latents`` in memory. With several
processes, each encodes every N-th batch of what is missing and then waits for the others'
files by looking at the folder, not in a collective that could time out.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save, save_file
from tqdm import tqdm

from config.errors import UserError
from data import Batch, TrainDataset
from models.bundle import ModelBundle
from training.latent_cache import (
    Key,
    LatentCache,
    build_latent_cache,
    encode_chunk,
    encoding_chunks,
    keys_needed,
)
from training.precision import Precision
from training.step import LatentDistribution

logger = logging.getLogger(__name__)

# Bumped whenever an entry's contents or the way pixels are made from a file changes.
ENTRY_FORMAT = 1
WAIT_POLL_SECONDS = 0.5
WAIT_WITHOUT_PROGRESS_SECONDS = 1800.0


@dataclass(frozen=True)
class EntryIdentity:
    """What every entry of a run shares: the VAE, its autocast and the image transforms."""

    vae: str
    precision: str
    transforms: str


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_digest(vae: torch.nn.Module) -> str:
    """SHA-256 of the VAE's weights (names, dtypes, shapes, values) and its scaling factor."""
    digest = hashlib.sha256(repr(getattr(vae.config, "scaling_factor", None)).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def transforms_digest(transforms: object | None) -> str:
    """The identity of the plugins' image transforms: each plugin's class and source file."""
    plugins = getattr(transforms, "plugins", None) or []
    parts = []
    for plugin in plugins:
        if not hasattr(plugin, "transform_pil_image"):
            continue
        source = inspect.getsourcefile(type(plugin))
        content = "" if source is None else file_digest(Path(source))
        parts.append(f"{type(plugin).__qualname__}:{content}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def entry_key(image_digest: str, bucket: tuple[int, int], flipped: bool, who: EntryIdentity) -> str:
    """The entry's name: SHA-256 over everything that decides its latents."""
    fields = [ENTRY_FORMAT, image_digest, list(bucket), flipped, who.vae, who.precision]
    fields.append(who.transforms)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def entry_path(root: Path, key: str) -> Path:
    """``root/ab/cd/<key>.safetensors``."""
    return root / key[:2] / key[2:4] / f"{key}.safetensors"


def _crc(mean: torch.Tensor, std: torch.Tensor) -> str:
    crc = zlib.crc32(mean.numpy().tobytes())
    return f"{zlib.crc32(std.numpy().tobytes(), crc):08x}"


def write_entry(path: Path, mean: torch.Tensor, std: torch.Tensor) -> int:
    """Write one entry atomically (temporary file, then rename); its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mean, std = mean.contiguous(), std.contiguous()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"mean": mean, "std": std}, str(temporary), metadata={"crc32": _crc(mean, std)})
    os.replace(temporary, path)
    return path.stat().st_size


def read_entry(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An entry's (mean, std), or None when the file is missing, truncated or damaged."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        tensors = load(raw)  # from the bytes read: never a mapping of a file that changes
        mean, std = tensors["mean"], tensors["std"]
    except (OSError, ValueError, KeyError, SafetensorError, UnicodeDecodeError):
        return None
    if mean.shape != shape or std.shape != shape or mean.dtype != torch.float32:
        return None
    if header.get("__metadata__", {}).get("crc32") != _crc(mean, std):
        return None
    return mean, std


def entry_size(shape: tuple[int, ...]) -> int:
    """The size of a whole entry file of this latent shape."""
    zeros = torch.zeros(shape)
    return len(save({"mean": zeros, "std": zeros.clone()}, metadata={"crc32": _crc(zeros, zeros)}))


class DiskLatentCache:
    """Posteriors read from ``latent_cache_dir`` per batch: a `training.sources.BatchSource`."""

    def __init__(
        self, dataset: TrainDataset, root: Path, names: dict[Key, str], encoder: Encoder
    ) -> None:
        """``names``: each entry's key (its file's name); kept as strings, not paths, so that
        the memory per entry stays small."""
        self.dataset = dataset
        self.root = root
        self.names = names
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.names)

    def path(self, key: Key) -> Path:
        return entry_path(self.root, self.names[key])

    @property
    def paths(self) -> dict[Key, Path]:
        """Every entry's file (built on demand)."""
        return {key: self.path(key) for key in self.names}

    def batches(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int
    ) -> Iterator[Batch]:
        """The batches of the run from (epoch, start_batch) on, without pixels."""
        return self.dataset.batches_without_pixels(epoch, start_batch, end_epoch, grad_accum)

    def latents(self, batch: Batch) -> LatentDistribution:
        keys = list(zip(batch.image_indices, batch.flipped, strict=True))
        entries = [self._entry(key) for key in keys]
        device = self.encoder.device
        non_blocking = device.type == "cuda"
        mean = torch.stack([m for m, _ in entries]).to(device, non_blocking=non_blocking)
        std = torch.stack([s for _, s in entries]).to(device, non_blocking=non_blocking)
        return LatentDistribution(mean, std)

    def _entry(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.path(key)
        found = read_entry(path, self.encoder.shape(key))
        if found is not None:
            return found
        logger.warning("latent cache: %s is damaged; encoding its image again", path)
        chunk = self.encoder.chunk_of[key]
        mean, std = self.encoder.encode(chunk)[chunk.index(key)]
        write_entry(path, mean, std)
        return mean, std


class Encoder:
    """The VAE encoding of the cache's images, in the batches the memory cache encodes them
    in (`chunks`): an entry is always encoded with the same neighbours, so its values do not
    depend on which other entries were missing."""

    def __init__(
        self,
        dataset: TrainDataset,
        bundle: ModelBundle,
        precision: Precision,
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.bundle = bundle
        self.precision = precision
        self.device = device
        self.chunks = encoding_chunks(dataset, keys_needed(dataset))
        self.chunk_of = {key: chunk for chunk in self.chunks for key in chunk}

    def encode(self, chunk: list[Key]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return encode_chunk(self.dataset, self.bundle, self.precision, self.device, chunk)

    def shape(self, key: Key) -> tuple[int, ...]:
        width, height = self.dataset.images[key[0]].bucket
        channels = int(self.bundle.vae.config.latent_channels)
        return (channels, height // 8, width // 8)


def check_cache_dir(value: str) -> Path:
    """``latent_cache_dir`` as a folder this process can write (created if missing), checked
    before any model loads; `UserError` naming the problem otherwise."""
    root = Path(value).expanduser()
    probe = root / f".probe.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"latent_cache_dir: {root} cannot hold the cache: {reason}") from None
    return root


def open_disk_cache(
    dataset: TrainDataset,
    bundle: ModelBundle,
    precision: Precision,
    device: torch.device,
    root: Path,
) -> DiskLatentCache:
    """The disk cache of the dataset's images in ``root``: what is missing (or truncated) is
    encoded first, each process its share of the batches."""
    started = time.perf_counter()
    rank, world = dataset.settings.rank, dataset.settings.world_size
    encoder = Encoder(dataset, bundle, precision, device)
    who = EntryIdentity(
        vae_digest(bundle.vae), precision.describe(), transforms_digest(dataset.transforms)
    )
    names = _entry_names(dataset, who)

    def path(key: Key) -> Path:
        return entry_path(root, names[key])

    missing = [key for key in names if not _whole(path(key), encoder.shape(key), warn=True)]
    _barrier()  # every process has looked before any process writes
    lacking = set(missing)
    chunks = [chunk for chunk in encoder.chunks if lacking.intersection(chunk)]
    written = _encode(chunks[rank::world], path, encoder, lacking, show_progress=rank == 0)
    _wait_for([path(key) for key in missing], [encoder.shape(key) for key in missing])
    total = sum(path(key).stat().st_size for key in names)
    logger.info(
        "latent cache %s: %d entries, %d found, %d encoded (%d here, %.1f MiB written), "
        "%.1f MiB in all, ready in %.1f s",
        root,
        len(names),
        len(names) - len(missing),
        len(missing),
        sum(len(chunk) for chunk in chunks[rank::world]),
        written / 2**20,
        total / 2**20,
        time.perf_counter() - started,
    )
    return DiskLatentCache(dataset, root, names, encoder)


def _entry_names(dataset: TrainDataset, who: EntryIdentity) -> dict[Key, str]:
    digests: dict[int, str] = {}
    names: dict[Key, str] = {}
    for index, flipped in keys_needed(dataset):
        image = dataset.images[index]
        if index not in digests:
            digests[index] = file_digest(image.path)
        key = entry_key(digests[index], image.bucket, flipped, who)
        names[(index, flipped)] = key
    return names


_SIZES: dict[tuple[int, ...], int] = {}


def _whole(path: Path, shape: tuple[int, ...], warn: bool = False) -> bool:
    """Whether a whole entry of this shape is there (a truncated one is not)."""
    if shape not in _SIZES:
        _SIZES[shape] = entry_size(shape)
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size != _SIZES[shape] and warn:
        logger.warning("latent cache: %s is truncated or damaged; encoding it again", path)
    return size == _SIZES[shape]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _encode(
    chunks: list[list[Key]],
    path: Callable[[Key], Path],
    encoder: Encoder,
    lacking: set[Key],
    show_progress: bool,
) -> int:
    """Encode this process's chunks and write their lacking entries; the bytes written."""
    written = 0
    images = sum(len(chunk) for chunk in chunks)
    with tqdm(total=images, desc="latent cache", unit="image", disable=not show_progress) as bar:
        for chunk in chunks:
            for key, (mean, std) in zip(chunk, encoder.encode(chunk), strict=True):
                if key in lacking:
                    written += write_entry(path(key), mean, std)
            bar.update(len(chunk))
    return written


def _wait_for(paths: list[Path], shapes: list[tuple[int, ...]]) -> None:
    """Wait until the other processes have written their entries, by looking at the files."""
    remaining = list(zip(paths, shapes, strict=True))
    last_progress = time.monotonic()
    while True:
        left = [(path, shape) for path, shape in remaining if not _whole(path, shape)]
        if not left:
            return
        if len(left) < len(remaining):
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > WAIT_WITHOUT_PROGRESS_SECONDS:
            raise RuntimeError(
                f"latent cache: {len(left)} entries (such as {left[0][0]}) were not written "
                f"by the other processes in {WAIT_WITHOUT_PROGRESS_SECONDS:.0f} s"
            )
        remaining = left
        time.sleep(WAIT_POLL_SECONDS)


def latent_cache_for(
    dataset: TrainDataset,
    bundle: ModelBundle,
    precision: Precision,
    device: torch.device,
    cache_dir: str | None,
) -> LatentCache | DiskLatentCache:
    """``cache_latents``' cache: in memory, or in ``latent_cache_dir`` when it is set."""
    if cache_dir is None:
        return build_latent_cache(dataset, bundle, precision, device)
    return open_disk_cache(dataset, bundle, precision, device, Path(cache_dir).expanduser())
