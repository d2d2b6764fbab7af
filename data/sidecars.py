"""Reading the small text files that sit next to images: captions, yaml sidecars, folder files.

Every yaml key (image yaml, local.yaml, global.yaml) and one-number folder file is declared once,
in `SidecarKeys`, with its rule; keys that train.json also has (`flip_p`, `cond_dropout`) share
TrainConfig's rule object. Everything here raises `SidecarError` with a message that names the
file; the caller decides whether that skips one image (an image's own sidecar) or stops the run
(a folder file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from config.errors import did_you_mean
from config.fields import (
    InvalidValueError,
    field_types,
    parse_fields,
    rule_of,
    setting,
)
from config.fields import check_value as check_field_value
from config.train_config import TrainConfig
from data.errors import is_valid_text

# Maxima of the keys only folder files and yaml sidecars have (train.json keys use its rules).
MAX_MULTIPLY = 10_000.0
MAX_LOSS_SCALE = 1_000.0
MAX_RATING = 1_000_000.0
MAX_TAG_WEIGHT = 1_000_000.0
MAX_CAPTION_LENGTH = 1_000_000
MAX_BATCH_ID_LENGTH = 200
# A yaml `caption:` mapping may hold another `caption:`; deeper than this is refused.
MAX_CAPTION_NESTING = 4

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10× faster
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _rule_of_train_key(name: str) -> Any:
    """A sidecar key with the very rule of the train.json key of the same name."""
    return field(default=None, metadata={"rule": rule_of(_TRAIN_FIELDS[name])})


@dataclass(frozen=True)
class SidecarKeys:
    """The keys of an image's yaml, local.yaml and global.yaml (EveryDream2's), with their rules.
    `multiply`, `flip_p`, `cond_dropout`, `loss_scale`, `batch_id` and `shuffle_tags` are also
    one-value folder files (`multiply.txt`, ...)."""

    main_prompt: str | None = setting(None, "The caption's first part (kept first when shuffling).")
    caption: Any = setting(
        None, "EveryDream2's alternative to main_prompt: a caption text or a mapping of these keys."
    )
    tags: Any = setting(None, "Tags after the main prompt: strings or {tag, weight} mappings.")
    multiply: float | None = setting(
        None, "Times the image is used per epoch.", minimum=0.0, maximum=MAX_MULTIPLY
    )
    flip_p: float | None = _rule_of_train_key("flip_p")
    cond_dropout: float | None = _rule_of_train_key("cond_dropout")
    loss_scale: float | None = setting(
        None, "Multiplier of the image's loss.", minimum=0.0, maximum=MAX_LOSS_SCALE
    )
    batch_id: str | None = setting(None, "Images of one batch_id are batched only together.")
    shuffle_tags: bool | None = setting(None, "Shuffle the image's tags.")
    rating: float | None = setting(
        None, "With rated_dataset: relative chance to be kept.", minimum=0.0, maximum=MAX_RATING
    )
    max_caption_length: int | None = setting(
        None,
        "Shuffled captions stop before this many characters.",
        minimum=1,
        maximum=MAX_CAPTION_LENGTH,
    )
    image: Any = setting(None, "EveryDream2's image path of a yaml; not used (images are scanned).")


@dataclass(frozen=True)
class TagKeys:
    """A tag given as a mapping: `{tag: ..., weight: ...}`."""

    tag: Any = setting(None, "The tag's text.")
    weight: float | None = setting(
        None, "Shuffle weight.", minimum=0.0, exclusive_minimum=True, maximum=MAX_TAG_WEIGHT
    )


YAML_KEYS = tuple(f.name for f in dataclasses.fields(SidecarKeys))
# Settings of an image: the nearest file that sets one wins.
SETTING_KEYS = (
    "multiply",
    "flip_p",
    "cond_dropout",
    "loss_scale",
    "batch_id",
    "rating",
    "max_caption_length",
)
_NUMBER_KEYS = ("multiply", "flip_p", "cond_dropout", "loss_scale", "rating", "max_caption_length")
# (type, rule) of each key, looked up once (a tag list may hold 100,000s of mappings)
_CHECKS = {
    cls: {f.name: (field_types(cls)[f.name], rule_of(f)) for f in dataclasses.fields(cls)}
    for cls in (SidecarKeys, TagKeys)
}
# The text of shuffle_tags.txt (any case); an empty file turns shuffling on, as in EveryDream2.
_FLAG_TEXTS = {
    "": True,
    "true": True,
    "yes": True,
    "1": True,
    "false": False,
    "no": False,
    "0": False,
}


class SidecarError(Exception):
    """A caption or settings file that cannot be used; the message names the file."""


Tag = tuple[str, float]  # (text, weight); weight 1.0 unless a yaml file says otherwise


@dataclass(frozen=True)
class SidecarValues:
    """What one file (or several, merged) says. `None` means "not set here".

    `main_prompts` and `tags` are in EveryDream2's order (nearest file first); only the first
    main prompt is used. `notes` are warnings about a file that is still used (unknown keys of
    an image's yaml, a tag mapping without its tag, the unused `image` key).
    """

    main_prompts: tuple[str, ...] = ()
    tags: tuple[Tag, ...] = ()
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    loss_scale: float | None = None
    batch_id: str | None = None
    rating: float | None = None
    max_caption_length: int | None = None
    shuffle_tags: bool | None = None
    notes: tuple[str, ...] = ()

    def over(self, farther: SidecarValues) -> SidecarValues:
        """These values with `farther` (a less specific file) behind them: main prompts and tags
        of both (these first), each setting from the nearest file that sets it, and shuffle_tags
        on when either turns it on (EveryDream2's rule)."""
        settings = {
            key: getattr(farther, key) if getattr(self, key) is None else getattr(self, key)
            for key in SETTING_KEYS
        }
        flags = (self.shuffle_tags, farther.shuffle_tags)
        shuffle = True if True in flags else (False if False in flags else None)
        return SidecarValues(
            main_prompts=self.main_prompts + farther.main_prompts,
            tags=self.tags + farther.tags,
            shuffle_tags=shuffle,
            notes=self.notes + farther.notes,
            **settings,
        )


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
    """`"a photo of ted, smiling, outdoors"` → main prompt plus comma-separated tags (as
    EveryDream2 reads a .txt/.caption file or a file-name caption); empty parts are left out."""
    parts = [part.strip() for part in text.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        return SidecarValues()
    return SidecarValues(main_prompts=(parts[0],), tags=tuple((part, 1.0) for part in parts[1:]))


def check_value(
    key: str, value: Any, where: str, keys: type = SidecarKeys, prefix: str = ""
) -> Any:
    """`value` of `key` (of `keys`: SidecarKeys or TagKeys) in its type, checked against the
    key's one rule; SidecarError naming the file (`where`) and the key otherwise."""
    field_type, rule = _CHECKS[keys][key]
    try:
        typed = check_field_value(value, field_type, rule)
    except InvalidValueError as error:
        raise SidecarError(f"{where}: {prefix}{key}{error.index}: {error}") from None
    return typed


def _number_text(value: Any) -> Any:
    """A number written as text (YAML 1.1 reads `1e12` as a string) as a float; else unchanged."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _text(value: str, where: str, key: str) -> str:
    if not is_valid_text(value):
        raise SidecarError(f"{where}: {key}: not valid Unicode text")
    return value.strip()


def _batch_id(value: Any, where: str) -> str | None:
    """A batch id: text (a yaml number is taken as its text), at most MAX_BATCH_ID_LENGTH
    characters; empty means "not set"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    text = _text(check_value("batch_id", value, where), where, "batch_id")
    if len(text) > MAX_BATCH_ID_LENGTH:
        raise SidecarError(
            f"{where}: batch_id: at most {MAX_BATCH_ID_LENGTH} characters, got {len(text)}"
        )
    return text or None


def _unknown(
    key: object, where: str, choices: tuple[str, ...], strict: bool, prefix: str = ""
) -> str:
    """The note (or, `strict`, the error) for an unknown key, with the closest valid key."""
    message = f"{prefix}{key}: unknown key{did_you_mean(str(key), choices)}"
    if strict:
        raise SidecarError(f"{where}: {message}")
    return message


def _parse_tag(item: Any, where: str, path: str, strict: bool) -> tuple[Tag | None, list[str]]:
    """One entry of `tags`: a string, a number (its text) or `{tag: ..., weight: ...}`."""
    if isinstance(item, str):
        return (_text(item, where, path), 1.0), []
    if isinstance(item, int | float) and not isinstance(item, bool):
        return (str(item), 1.0), []
    if not isinstance(item, dict):
        raise SidecarError(
            f"{where}: {path}: each tag must be a string or {{tag: ..., weight: ...}}, got {item!r}"
        )
    names = ("tag", "weight")
    notes = [_unknown(k, where, names, strict, f"{path}.") for k in item if str(k) not in names]
    weight = item.get("weight")
    if weight is not None:
        weight = check_value("weight", _number_text(weight), where, TagKeys, f"{path}.")
    text = item.get("tag")
    if isinstance(text, int | float) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        if text is None and not strict:
            return None, [*notes, f"{path}: a tag mapping without 'tag' (left out)"]
        raise SidecarError(f"{where}: {path}.tag: expected a string, got {text!r}")
    return (_text(text, where, f"{path}.tag"), 1.0 if weight is None else weight), notes


def _parse_tags(value: Any, where: str, strict: bool) -> tuple[tuple[Tag, ...], list[str]]:
    if value is None:
        return (), []
    if isinstance(value, str):
        return split_caption(_text(value, where, "tags")).tags, []
    if not isinstance(value, list):
        raise SidecarError(f"{where}: tags: must be a list, got {type(value).__name__}")
    tags: list[Tag] = []
    notes: list[str] = []
    for number, item in enumerate(value):
        tag, tag_notes = _parse_tag(item, where, f"tags[{number}]", strict)
        notes += tag_notes
        if tag is not None and tag[0]:
            tags.append(tag)
    return tuple(tags), notes


def parse_mapping(data: dict, where: str, strict: bool, depth: int = 0) -> SidecarValues:
    """The values of one yaml mapping. `strict` (folder files): an unknown key is an error;
    otherwise (an image's own yaml) it is a note and the image is still used."""
    notes = [_unknown(k, where, YAML_KEYS, strict) for k in data if str(k) not in YAML_KEYS]
    known = {str(k): v for k, v in data.items() if str(k) in YAML_KEYS}
    for key in _NUMBER_KEYS:
        if key in known:
            known[key] = _number_text(known[key])
    raw_batch_id = known.pop("batch_id", None)
    values, problems = parse_fields(SidecarKeys, known, where)
    if problems:
        raise SidecarError("; ".join(problems))
    tags, tag_notes = _parse_tags(values.get("tags"), where, strict)
    main = values.get("main_prompt")
    main_prompts = (_text(main, where, "main_prompt"),) if main is not None else ()
    if "image" in values:
        notes.append("image: not used (images are found by scanning data_root)")
    own = SidecarValues(
        main_prompts=tuple(p for p in main_prompts if p),
        tags=tags,
        batch_id=None if raw_batch_id is None else _batch_id(raw_batch_id, where),
        shuffle_tags=values.get("shuffle_tags"),
        notes=tuple(notes + tag_notes),
        **{key: values.get(key) for key in _NUMBER_KEYS},
    )
    caption = values.get("caption")
    if caption is None:
        return own
    return _caption_values(caption, where, strict, depth).over(own)


def _caption_values(caption: Any, where: str, strict: bool, depth: int) -> SidecarValues:
    """EveryDream2's `caption:` key: a caption text, or a mapping of the same keys; what it
    gives comes before the file's own main_prompt and tags."""
    if isinstance(caption, str):
        return split_caption(_text(caption, where, "caption"))
    if isinstance(caption, dict):
        if depth >= MAX_CAPTION_NESTING:
            raise SidecarError(f"{where}: caption: nested more than {MAX_CAPTION_NESTING} deep")
        return parse_mapping(caption, where, strict, depth + 1)
    raise SidecarError(
        f"{where}: caption: must be a text or a mapping, got {type(caption).__name__}"
    )


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a large YAML document allocates so many objects
    that repeated collections make loading it quadratic (memory is freed by reference counts
    as usual)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_yaml_file(path: Path, strict: bool) -> SidecarValues:
    """An image's yaml sidecar (`strict=False`) or a folder's local.yaml / global.yaml."""
    text = read_text(path)
    try:
        data = yaml.load(
            text, Loader=_YAML_LOADER
        )  # a safe loader (CSafeLoader when libyaml is there)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SidecarError(f"{path}: not valid YAML{where}: {first_line}") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer of 5000 digits
        raise SidecarError(f"{path}: cannot be read as YAML: {error}") from None
    if data is None:
        return SidecarValues()
    if not isinstance(data, dict):
        raise SidecarError(
            f"{path}: must be a mapping with keys such as main_prompt and tags, got "
            f"{type(data).__name__}"
        )
    return parse_mapping(data, str(path), strict)


def read_value_file(path: Path, key: str) -> Any:
    """A one-value folder file: `multiply.txt`, `flip_p.txt`, `cond_dropout.txt`,
    `loss_scale.txt` (a number), `batch_id.txt` (a name), `shuffle_tags.txt` (empty or
    true/false)."""
    text = read_text(path)
    where = str(path)
    if key == "batch_id":
        return _batch_id(text, where)
    if key == "shuffle_tags":
        if text.lower() not in _FLAG_TEXTS:
            raise SidecarError(
                f"{where}: shuffle_tags: expected an empty file, true or false, got {text[:40]!r}"
            )
        return _FLAG_TEXTS[text.lower()]
    try:
        value = float(text)
    except ValueError:
        raise SidecarError(f"{where}: {key}: must hold one number, got {text[:40]!r}") from None
    return check_value(key, value, where)


def filename_caption(path: Path) -> str:
    """EveryDream2's file-name caption: the name without extension, cut at the first `_`
    (`a photo of ted_2.jpg` → `a photo of ted`). A name starting with `_` keeps its whole stem."""
    stem = path.stem
    cut = stem.split("_", 1)[0].strip()
    return cut if cut else stem.strip()
