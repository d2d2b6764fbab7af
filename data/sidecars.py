"""Reading the small text files that sit next to images: captions, yaml sidecars, folder files.

Everything here raises `SidecarError` with a message that names the file; the caller decides
whether that skips one image (an image's own sidecar) or stops the run (a folder file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from config.errors import did_you_mean

# Keys of a yaml sidecar (image.yaml) or folder yaml (local.yaml / global.yaml).
CAPTION_KEYS = ("main_prompt", "caption", "tags")
NUMBER_KEYS = ("multiply", "flip_p", "cond_dropout")
# EveryDream2 keys that this trainer reads but does not use; they are reported once, not errors.
IGNORED_KEYS = ("rating", "max_caption_length", "batch_id", "loss_scale", "shuffle_tags", "image")
YAML_KEYS = CAPTION_KEYS + NUMBER_KEYS


class SidecarError(Exception):
    """A caption or settings file that cannot be used; the message names the file."""


Tag = tuple[str, float]  # (text, weight); weight 1.0 unless a yaml file says otherwise


@dataclass(frozen=True)
class SidecarValues:
    """What one yaml file (or caption text) says. `None` means "not set here"."""

    main_prompt: str | None = None
    tags: tuple[Tag, ...] = ()
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    ignored_keys: tuple[str, ...] = ()


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a byte-order mark dropped), whitespace trimmed."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise SidecarError(
            f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise SidecarError(f"{path}: cannot be read ({error.strerror})") from None


def split_caption(text: str) -> SidecarValues:
    """`"a photo of ted, smiling, outdoors"` → main prompt plus comma-separated tags."""
    parts = [part.strip() for part in text.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        return SidecarValues()
    return SidecarValues(main_prompt=parts[0], tags=tuple((part, 1.0) for part in parts[1:]))


def check_number(path: Path, key: str, value: object) -> float:
    """A multiply / flip_p / cond_dropout value, checked for its allowed range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SidecarError(f"{path}: {key}: must be a number, got {value!r}")
    number = float(value)
    if key == "multiply" and number < 0:
        raise SidecarError(f"{path}: multiply: must be 0 or more (1 = once per epoch), got {value}")
    if key in ("flip_p", "cond_dropout") and not 0.0 <= number <= 1.0:
        raise SidecarError(f"{path}: {key}: must be between 0 and 1, got {value}")
    return number


def read_number_file(path: Path, key: str) -> float:
    """A one-number folder file such as multiply.txt."""
    text = read_text(path)
    try:
        value = float(text)
    except ValueError:
        raise SidecarError(f"{path}: {key}: must hold one number, got {text!r}") from None
    return check_number(path, key, value)


def _parse_tag(path: Path, item: object) -> Tag:
    if isinstance(item, str):
        return (item.strip(), 1.0)
    if isinstance(item, dict) and isinstance(item.get("tag"), str):
        unknown = sorted(set(item) - {"tag", "weight"})
        if unknown:
            raise SidecarError(
                f"{path}: tags: unknown key '{unknown[0]}' (a tag is a string or "
                f"{{tag: ..., weight: ...}}){did_you_mean(str(unknown[0]), ('tag', 'weight'))}"
            )
        weight = item.get("weight")
        if weight is None:
            return (item["tag"].strip(), 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise SidecarError(f"{path}: tags: weight must be a number above 0, got {weight!r}")
        return (item["tag"].strip(), float(weight))
    raise SidecarError(
        f"{path}: tags: each tag must be a string or {{tag: ..., weight: ...}}, got {item!r}"
    )


def _parse_tags(path: Path, value: object) -> tuple[Tag, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple((part.strip(), 1.0) for part in value.split(",") if part.strip())
    if not isinstance(value, list):
        raise SidecarError(f"{path}: tags: must be a list, got {type(value).__name__}")
    return tuple(tag for tag in (_parse_tag(path, item) for item in value) if tag[0])


def _parse_main(path: Path, data: dict) -> tuple[str | None, tuple[Tag, ...]]:
    """The main prompt and any tags that come with a `caption:` text (EveryDream2's alternative)."""
    main, caption = data.get("main_prompt"), data.get("caption")
    if main is not None and caption is not None:
        raise SidecarError(f"{path}: give main_prompt or caption, not both")
    for key, value in (("main_prompt", main), ("caption", caption)):
        if value is not None and not isinstance(value, str):
            raise SidecarError(f"{path}: {key}: must be text, got {type(value).__name__}")
    if caption is not None:
        values = split_caption(caption)
        return values.main_prompt, values.tags
    stripped = main.strip() if main is not None else ""
    return (stripped if stripped else None), ()


def read_yaml_file(path: Path) -> SidecarValues:
    """An image's yaml sidecar or a folder's local.yaml / global.yaml."""
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SidecarError(f"{path}: not valid YAML{where}: {first_line}") from None
    if data is None:
        return SidecarValues()
    if not isinstance(data, dict):
        raise SidecarError(
            f"{path}: must be a mapping with keys such as main_prompt and tags, got "
            f"{type(data).__name__}"
        )
    for key in data:
        if str(key) not in YAML_KEYS and str(key) not in IGNORED_KEYS:
            allowed = ", ".join(YAML_KEYS)
            raise SidecarError(
                f"{path}: unknown key '{key}' (allowed: {allowed})"
                f"{did_you_mean(str(key), YAML_KEYS)}"
            )
    main, caption_tags = _parse_main(path, data)
    numbers = {
        key: check_number(path, key, data[key]) for key in NUMBER_KEYS if data.get(key) is not None
    }
    return SidecarValues(
        main_prompt=main,
        tags=caption_tags + _parse_tags(path, data.get("tags")),
        ignored_keys=tuple(sorted(str(key) for key in data if str(key) in IGNORED_KEYS)),
        **numbers,
    )


def filename_caption(path: Path) -> str:
    """EveryDream2's file-name caption: the name without extension, cut at the first `_`
    (`a photo of ted_2.jpg` → `a photo of ted`). A name starting with `_` keeps its whole stem."""
    stem = path.stem
    cut = stem.split("_", 1)[0].strip()
    return cut if cut else stem.strip()
