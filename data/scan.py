"""The one-time scan of `data_root`: image files, their captions and settings, their sizes."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from config.errors import UserError
from data.buckets import Size, make_buckets, nearest_bucket
from data.captions import CAPTION_EXTENSIONS, compose, read_own_sidecars
from data.errors import is_valid_text, printable
from data.folders import FOLDER_FILE_NAMES, FolderConfig, read_folder
from data.images import IMAGE_EXTENSIONS, UnusableImageError, probe_image
from data.masks import is_mask_file
from data.settings import DataSettings, available_cpus
from data.sidecars import SidecarError

# Why a file or folder whose name is not valid UTF-8 is skipped.
NOT_UTF8 = (
    "name is not valid UTF-8 (it would break the tokenizer, the logs and the schedule file); "
    "rename it"
)

logger = logging.getLogger(__name__)

# Threads that decode images during the scan (Pillow releases the GIL while decoding).
MAX_SCAN_THREADS = 8
# An image's settings when no file says otherwise (train.json gives flip_p and cond_dropout).
DEFAULT_MULTIPLY = 1.0
DEFAULT_LOSS_SCALE = 1.0
DEFAULT_RATING = 1.0
# Most image slots one epoch may have (after multiply): each epoch's plan is built in memory.
MAX_IMAGES_PER_EPOCH = 10_000_000


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An image file whose caption and settings are read but whose pixels are not yet checked."""

    path: Path
    caption: str
    caption_source: str
    parts: tuple[str, ...]
    weights: tuple[float, ...]
    multiply: float
    flip_p: float
    cond_dropout: float
    loss_scale: float
    batch_id: str | None
    shuffle_tags: bool
    rating: float
    max_caption_length: int | None


@dataclass(frozen=True, slots=True)
class ImageRecord(_Candidate):
    """One usable image with everything decided about it at scan time.

    `index` is stable for a given data_root content (position in the sorted path list) and is
    what a latent cache keys on, together with the flip. `parts` are the caption's main prompt
    and tags (kept in place / shuffled by tag shuffling), `weights` one per part. `shuffle_tags`
    is train.json's or any of the image's files'; `batch_id` None is the common pool.
    """

    index: int
    size: Size
    bucket: Size


class _Notes:
    """Warnings about files that are still used, one line per kind with a count and an example."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, str]] = {}

    def add(self, message: str, example: str) -> None:
        count, first = self.seen.get(message, (0, example))
        self.seen[message] = (count + 1, first)

    def log(self) -> None:
        for message, (count, example) in sorted(self.seen.items()):
            logger.warning("%s (%d file(s), e.g. %s)", message, count, example)


def _caption_files(names: set[str]) -> dict[tuple[str, str], str]:
    """(stem, lower-case extension) → file name, for the possible caption sidecars of a folder."""
    found: dict[tuple[str, str], str] = {}
    for name in sorted(names):
        if name in FOLDER_FILE_NAMES:
            continue
        stem, extension = os.path.splitext(name)
        if extension.lower() in CAPTION_EXTENSIONS:
            found.setdefault((stem, extension.lower()), name)
    return found


def _candidate(
    image: Path,
    sidecars: dict[tuple[str, str], str],
    folder: FolderConfig,
    settings: DataSettings,
    notes: _Notes,
) -> _Candidate:
    """The caption and settings of one image; raises SidecarError for an unusable sidecar."""
    own, own_names = read_own_sidecars(image, sidecars)
    caption = compose(image, own, own_names, folder)
    values = own.over(folder)
    for note in own.notes:
        notes.add(f"image yaml: {note}; the image is used without it", str(image))
    if caption.unused_main_prompts:
        notes.add(
            "more than one main prompt: the first is used (order: .yaml, .yml, .caption, .txt, "
            "local files, global.yaml)",
            f"{image}: {caption.parts[0]!r}, not "
            + ", ".join(map(repr, caption.unused_main_prompts)),
        )

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    return _Candidate(
        path=image,
        caption=caption.text,
        caption_source=caption.source,
        parts=caption.parts,
        weights=caption.weights,
        multiply=pick(values.multiply, DEFAULT_MULTIPLY),
        flip_p=pick(values.flip_p, settings.flip_p),
        cond_dropout=pick(values.cond_dropout, settings.cond_dropout),
        loss_scale=pick(values.loss_scale, DEFAULT_LOSS_SCALE),
        batch_id=values.batch_id,
        shuffle_tags=settings.shuffle_tags or values.shuffle_tags is True,
        rating=pick(values.rating, DEFAULT_RATING),
        max_caption_length=values.max_caption_length,
    )


def _walk(root: Path, skipped: list[dict[str, str]]) -> list[tuple[Path, set[str]]]:
    """Every folder under root (symlinks followed, each real folder once), sorted, with the
    names of the files it holds. Hidden files and folders (name starting with ".", such as
    macOS "._x.jpg" resource forks or ".ipynb_checkpoints") are left out. A folder that cannot
    be read or whose name is not UTF-8 is listed in `skipped` with its reason."""
    folders: list[tuple[Path, set[str]]] = []
    seen: set[str] = set()
    errors: list[OSError] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=True, onerror=errors.append):
        real = os.path.realpath(directory)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        kept: list[str] = []
        for name in sorted(n for n in dirnames if not n.startswith(".")):
            if is_valid_text(name):
                kept.append(name)
            else:
                _skip(skipped, Path(directory, name), f"{NOT_UTF8}; its images are not used")
        dirnames[:] = kept
        folders.append((Path(directory), {n for n in filenames if not n.startswith(".")}))
    for error in errors:
        where = Path(error.filename) if error.filename is not None else root
        reason = error.strerror or str(error)
        if where == root:
            raise UserError(f"data_root: {printable(root)} cannot be read ({reason})")
        _skip(skipped, where, f"folder cannot be read ({reason}); its images are not used")
    return folders


def _collect(settings: DataSettings, skipped: list[dict[str, str]]) -> list[_Candidate]:
    """Walk data_root, read folder files and caption sidecars; no image is decoded yet."""
    inherited: dict[Path, FolderConfig] = {}
    candidates: list[_Candidate] = []
    notes = _Notes()
    for directory, names in _walk(settings.data_root, skipped):
        parent = inherited.get(directory.parent, FolderConfig())
        for_images, inherited[directory] = read_folder(directory, names, parent)
        sidecars = _caption_files(names)
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS or is_mask_file(name):
                continue
            image = directory / name
            if not is_valid_text(name):
                _skip(skipped, image, NOT_UTF8)
                continue
            try:
                candidates.append(_candidate(image, sidecars, for_images, settings, notes))
            except SidecarError as error:
                _skip(skipped, image, str(error))
    _note_unused_settings(candidates, settings, notes)
    notes.log()
    return candidates


def _note_unused_settings(
    candidates: list[_Candidate], settings: DataSettings, notes: _Notes
) -> None:
    """Settings that a file sets but that do nothing in this run are said, never ignored."""
    for candidate in candidates:
        if not settings.rated_dataset and candidate.rating != DEFAULT_RATING:
            notes.add("rating is used only with rated_dataset: true", str(candidate.path))
        if candidate.max_caption_length is not None and not candidate.shuffle_tags:
            notes.add("max_caption_length applies to shuffled captions only", str(candidate.path))


def _check_epoch_size(root: Path, candidates: list[_Candidate]) -> None:
    """Refuse, before any image is decoded, an epoch too large to plan in memory."""
    total = math.floor(math.fsum(candidate.multiply for candidate in candidates))
    if total > MAX_IMAGES_PER_EPOCH:
        raise UserError(
            f"data_root: {root}: {total:,} images per epoch after multiply; at most "
            f"{MAX_IMAGES_PER_EPOCH:,} (lower the multiply values)"
        )


def _skip(skipped: list[dict[str, str]], path: Path, reason: str) -> None:
    logger.warning("skipping %s: %s", printable(path), reason)
    skipped.append({"path": printable(path), "reason": reason})


def _probe(path: Path) -> Size | str:
    try:
        return probe_image(path)
    except UnusableImageError as error:
        return str(error)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"


def scan(settings: DataSettings) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """All usable images under data_root (sorted by path) and the skipped ones with reasons.

    Raises UserError when data_root does not exist or holds no usable image, and for unusable
    folder files.
    """
    root = settings.data_root
    if not is_valid_text(str(root)):
        raise UserError(f"data_root: {printable(root)}: the path is not valid UTF-8")
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"data_root: {root} {what}")
    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    candidates = _collect(settings, skipped)
    _check_epoch_size(root, candidates)
    threads = max(1, min(MAX_SCAN_THREADS, available_cpus()))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = list(pool.map(_probe, (candidate.path for candidate in candidates)))
    buckets = make_buckets(settings.resolution)
    records: list[ImageRecord] = []
    for candidate, probe in zip(candidates, probes, strict=True):
        if isinstance(probe, str):
            _skip(skipped, candidate.path, probe)
            continue
        fields = {f.name: getattr(candidate, f.name) for f in dataclasses.fields(candidate)}
        records.append(
            ImageRecord(
                index=len(records), size=probe, bucket=nearest_bucket(probe, buckets), **fields
            )
        )
    skipped.sort(key=lambda entry: entry["path"])
    logger.info(
        "scanned %s: %d images, %d skipped, in %.1f s",
        root,
        len(records),
        len(skipped),
        time.perf_counter() - started,
    )
    if not records:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        if skipped:
            raise UserError(
                f"data_root: no usable image in {root}: all {len(skipped)} image files or "
                f"folders were skipped (first: {skipped[0]['path']}: {skipped[0]['reason']})"
            )
        raise UserError(f"data_root: no image files ({extensions}) found in {root}")
    return records, skipped
