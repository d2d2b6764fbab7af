"""The one-time scan of `data_root`: image files, their captions and settings, their sizes."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from config.errors import UserError
from data.buckets import Size, make_buckets, nearest_bucket
from data.folders import FOLDER_FILE_NAMES, FolderConfig, read_folder
from data.images import IMAGE_EXTENSIONS, UnusableImageError, probe_image
from data.settings import DataSettings, available_cpus
from data.sidecars import (
    SidecarError,
    SidecarValues,
    Tag,
    filename_caption,
    read_text,
    read_yaml_file,
    split_caption,
)

logger = logging.getLogger(__name__)

# Caption sidecars in the order they are looked for; the first one found is used.
CAPTION_EXTENSIONS = (".yaml", ".yml", ".txt", ".caption")
# Threads that decode images during the scan (Pillow releases the GIL while decoding).
MAX_SCAN_THREADS = 8
# Times each image is used per epoch when no multiply.txt / yaml says otherwise.
DEFAULT_MULTIPLY = 1.0


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ImageRecord(_Candidate):
    """One usable image with everything decided about it at scan time.

    `index` is stable for a given data_root content (position in the sorted path list) and is
    what a latent cache keys on, together with the flip. `parts` are the caption split at commas
    (the first part is the main prompt, kept in place by tag shuffling), `weights` one per part.
    """

    index: int
    size: Size
    bucket: Size


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


def _own_caption(
    image: Path, sidecars: dict[tuple[str, str], str]
) -> tuple[SidecarValues, str | None, str]:
    """The image's own sidecar: (values, raw caption text or None, source). No sidecar: empty
    values and source "file name"."""
    for extension in CAPTION_EXTENSIONS:
        name = sidecars.get((image.stem, extension))
        if name is None:
            continue
        path = image.with_name(name)
        if extension in (".yaml", ".yml"):
            return read_yaml_file(path), None, name
        text = read_text(path)
        if not text:
            logger.warning("%s is empty; using the file name caption for %s", path, image.name)
            return SidecarValues(), None, "file name"
        return split_caption(text), text, name
    return SidecarValues(), None, "file name"


def _merge_tags(parts: list[str], weights: list[float], extra: tuple[Tag, ...]) -> list[str]:
    """Append tags not already present; return the ones appended."""
    added: list[str] = []
    for text, weight in extra:
        if text and text not in parts:
            parts.append(text)
            weights.append(weight)
            added.append(text)
    return added


def _candidate(
    image: Path,
    sidecars: dict[tuple[str, str], str],
    folder: FolderConfig,
    settings: DataSettings,
) -> tuple[_Candidate, tuple[str, ...]]:
    """The caption and settings of one image; raises SidecarError for an unusable sidecar."""
    own, raw_text, source = _own_caption(image, sidecars)
    main = own.main_prompt
    if main is None and folder.main_prompt is not None:
        main, source = folder.main_prompt, f"{source} + folder main_prompt"
    if main is None:
        main = filename_caption(image)
    parts, weights = [main], [1.0]
    own_tags = _merge_tags(parts, weights, own.tags)
    folder_tags = _merge_tags(parts, weights, folder.tags)
    if raw_text is not None:
        caption = ", ".join([raw_text, *folder_tags])
    else:
        caption = ", ".join(part for part in [main, *own_tags, *folder_tags] if part)

    def pick(key: str, default: float) -> float:
        """Nearest setting: the image's yaml, then the folder files, then `default`."""
        for value in (getattr(own, key), getattr(folder, key)):
            if value is not None:
                return value
        return default

    candidate = _Candidate(
        path=image,
        caption=caption,
        caption_source=source,
        parts=tuple(parts),
        weights=tuple(weights),
        multiply=pick("multiply", DEFAULT_MULTIPLY),
        flip_p=pick("flip_p", settings.flip_p),
        cond_dropout=pick("cond_dropout", settings.cond_dropout),
    )
    return candidate, own.ignored_keys


def _walk(root: Path) -> list[tuple[Path, set[str]]]:
    """Every folder under root (symlinks followed, each real folder once), sorted, with the
    names of the files it holds. Hidden files and folders (name starting with ".", such as
    macOS "._x.jpg" resource forks or ".ipynb_checkpoints") are left out."""
    folders: list[tuple[Path, set[str]]] = []
    seen: set[str] = set()
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        folders.append((Path(directory), {n for n in filenames if not n.startswith(".")}))
    return folders


def _collect(settings: DataSettings, skipped: list[dict[str, str]]) -> list[_Candidate]:
    """Walk data_root, read folder files and caption sidecars; no image is decoded yet."""
    inherited: dict[Path, FolderConfig] = {}
    candidates: list[_Candidate] = []
    ignored: Counter[str] = Counter()
    for directory, names in _walk(settings.data_root):
        parent = inherited.get(directory.parent, FolderConfig())
        for_images, inherited[directory] = read_folder(directory, names, parent)
        sidecars = _caption_files(names)
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            image = directory / name
            try:
                candidate, ignored_keys = _candidate(image, sidecars, for_images, settings)
            except SidecarError as error:
                _skip(skipped, image, str(error))
                continue
            ignored.update(ignored_keys)
            candidates.append(candidate)
    for key, count in sorted(ignored.items()):
        logger.warning("%d image yaml file(s) set '%s', which this trainer ignores", count, key)
    return candidates


def _skip(skipped: list[dict[str, str]], path: Path, reason: str) -> None:
    logger.warning("skipping %s: %s", path, reason)
    skipped.append({"path": str(path), "reason": reason})


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
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"data_root: {root} {what}")
    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    candidates = _collect(settings, skipped)
    threads = max(1, min(MAX_SCAN_THREADS, available_cpus()))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = list(pool.map(_probe, (candidate.path for candidate in candidates)))
    buckets = make_buckets(settings.resolution)
    records: list[ImageRecord] = []
    for candidate, probe in zip(candidates, probes, strict=True):
        if isinstance(probe, str):
            _skip(skipped, candidate.path, probe)
            continue
        fields = dict(candidate.__dict__)
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
                f"data_root: no usable image in {root}: all {len(skipped)} image files were "
                f"skipped (first: {skipped[0]['path']}: {skipped[0]['reason']})"
            )
        raise UserError(f"data_root: no image files ({extensions}) found in {root}")
    return records, skipped
