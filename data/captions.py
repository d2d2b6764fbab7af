"""Captions as EveryDream2 builds them: merging an image's sidecars and folder files, ordering
tags by weight, and the per-use tag shuffle.

Order of everything (nearest first): the image's `.yaml`, `.yml`, `.caption`, `.txt`, then the
folder's local files, then each global.yaml from nearest to farthest. The first main prompt in
that order is the caption's first part; the others are not used (a warning says so). Without
any main prompt the file name gives the caption (split at commas like a .txt). Tags of all
sources follow, each text once, heavier yaml weights first (a stable sort, so equal weights keep
the order above). Everything here is linear in the number of tags (plus the sort).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from data.draws import shuffle, weighted_order
from data.sidecars import (
    SidecarValues,
    Tag,
    filename_caption,
    read_text,
    read_yaml_file,
    split_caption,
)

logger = logging.getLogger(__name__)

# An image's own caption files, nearest first (EveryDream2 merges all of them in this order).
CAPTION_EXTENSIONS = (".yaml", ".yml", ".caption", ".txt")


@dataclass(frozen=True)
class Caption:
    """An image's caption: `parts[0]` is the main prompt, the rest its tags (heaviest first),
    `weights` one per part. `unused_main_prompts` are the main prompts after the first."""

    parts: tuple[str, ...]
    weights: tuple[float, ...]
    source: str
    unused_main_prompts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return ", ".join(self.parts)


def read_own_sidecars(
    image: Path, sidecars: dict[tuple[str, str], str]
) -> tuple[SidecarValues, tuple[str, ...]]:
    """The image's own caption files merged, nearest first, and their names. `sidecars` maps
    (stem, lower-case extension) to a file name of the folder. Raises SidecarError."""
    merged = SidecarValues()
    names: list[str] = []
    for extension in reversed(CAPTION_EXTENSIONS):  # farthest first, each over the merge
        name = sidecars.get((image.stem, extension))
        if name is None:
            continue
        path = image.with_name(name)
        if extension in (".yaml", ".yml"):
            values = read_yaml_file(path, strict=False)
        else:
            text = read_text(path)
            if not text:
                logger.warning(
                    "%s is empty; it adds nothing to the caption of %s", path, image.name
                )
            values = split_caption(text)
        merged = values.over(merged)
        names.insert(0, name)
    return merged, tuple(names)


def _unique_by_weight(tags: list[Tag]) -> list[Tag]:
    """Each tag text once (its first occurrence), heavier first, otherwise in order."""
    seen: set[str] = set()
    unique: list[Tag] = []
    for text, weight in tags:
        if text and text not in seen:
            seen.add(text)
            unique.append((text, weight))
    unique.sort(key=lambda tag: -tag[1])
    return unique


def compose(
    image: Path, own: SidecarValues, own_names: tuple[str, ...], folder: SidecarValues
) -> Caption:
    """The caption of `image` from its own files (`own`, named `own_names`) and the folder
    files in force (`folder`)."""
    merged = own.over(folder)
    tags = list(merged.tags)
    source = " + ".join(own_names) if own_names else "file name"
    if merged.main_prompts:
        main, unused = merged.main_prompts[0], merged.main_prompts[1:]
        if not own.main_prompts:
            source = f"{source} + folder main_prompt"
    else:
        by_name = split_caption(filename_caption(image))
        main = by_name.main_prompts[0] if by_name.main_prompts else image.stem
        tags = list(by_name.tags) + tags
        unused = ()
        if own_names:
            source = f"{source} + file name"
    ordered = _unique_by_weight(tags)
    return Caption(
        parts=(main, *(text for text, _ in ordered)),
        weights=(1.0, *(weight for _, weight in ordered)),
        source=source,
        unused_main_prompts=unused,
    )


def render_caption(
    parts: tuple[str, ...],
    weights: tuple[float, ...],
    rng: random.Random,
    keep_tags: int,
    max_length: int | None,
) -> str:
    """A shuffled caption: the main prompt and the next `keep_tags` tags stay in place, the
    others are shuffled (a weighted shuffle when their weights differ: heavier tags tend to
    come first). With `max_length`, tags are added only while the caption stays within that
    many characters."""
    keep = 1 + keep_tags
    rest = list(parts[keep:])
    rest_weights = weights[keep:]
    if len(set(rest_weights)) > 1:
        rest = [rest[i] for i in weighted_order(rng, rest_weights)]
    else:
        shuffle(rng, rest)
    chosen = list(parts[:keep]) + rest
    if max_length is not None:
        length, count = len(chosen[0]), 1
        while count < len(chosen) and length + 2 + len(chosen[count]) <= max_length:
            length += 2 + len(chosen[count])
            count += 1
        chosen = chosen[:count]
    return ", ".join(chosen)
