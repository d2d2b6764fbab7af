"""Regenerate the tiny CLIP tokenizer kept in this folder.

    .venv/bin/python models/tokenizer/make_tokenizer.py

The built-in models (``tiny-sd15``, ``tiny-sd21``, ``sd15-random``, ``sd21-random``) need a
tokenizer without any download. This script writes one in the layout of OpenAI's CLIP tokenizer,
so ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it:

- ``vocab.json``: the 256 byte-level symbols, the same 256 with ``</w>`` (so any text can be
  tokenized), the tokens made by the merges, then ``<|startoftext|>`` and ``<|endoftext|>``;
- ``merges.txt``: ``#version: 0.2`` then BPE merges learnt from the small caption corpus below
  (split into words by CLIP's own normalizer and pre-tokenizer from the ``tokenizers`` library);
- ``tokenizer_config.json`` and ``special_tokens_map.json``: bos ``<|startoftext|>``, eos, pad and
  unk ``<|endoftext|>``, ``model_max_length`` 77.

The output is deterministic: running the script again writes the same files.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
# Upper bound on the number of merges (the corpus below needs fewer).
MAX_MERGES = 2000

# Words typical of image captions; each line is one "sentence" of the training corpus.
CORPUS = """
a photo of ted, smiling
a photo of a man and a woman standing in the street
a portrait of a young woman with long hair, looking at the camera
a close up photo of a person wearing a red shirt and blue jeans
an old man sitting on a wooden bench in the park
a painting of a landscape with mountains, trees and a river at sunset
a digital illustration of a cat sleeping on a sofa
a dog running on the beach, ocean waves in the background
a black and white photograph of a city at night
a woman holding a cup of coffee, soft light, high quality
a child playing with a ball in the garden, summer, sunny day
a car parked in front of a house, green grass, blue sky, white clouds
a cartoon drawing of a happy girl with a yellow dress
the face of a smiling boy, detailed, sharp focus
a group of people walking on a bridge over the water
a bowl of fruit on a table, still life, oil painting
a bird flying in the sky above the forest
a castle on a hill, fantasy art, dramatic lighting
a beautiful flower in a glass vase next to the window
two friends laughing together, candid photo, natural light
a man in a suit and tie, studio portrait, dark background
a woman in a hat walking through a field of flowers
a small boat on a lake, reflection, morning fog
a snowy road through the winter forest, cold, quiet
a anime character with short hair and big eyes, full body
a 3d render of a robot, metal, futuristic, high detail
a building with large windows, modern architecture
a horse standing in a field, brown and white, golden hour
a family having dinner at home, warm colors, cozy
a picture of my friend wearing glasses, smiling, from the side
an image of food on a plate, restaurant, delicious
a sketch of a face, pencil drawing, black lines on paper
a man with a beard and a hat, outdoors, standing near a tree
a woman sitting on a chair reading a book in a room
a photo taken from above, aerial view of the city, buildings and streets
an artwork by an artist, colorful, abstract, shapes and patterns
a selfie of a person with a dog, happy, bright
his hand holding her hand, wedding, love
a street at night with lights, rain, wet ground, neon signs
a view of the sea from the top of a mountain, wide angle
they are looking at each other, side view, medium shot
she is wearing a green jacket, he is wearing a black coat
one, two, three, four, five, six, seven, eight, nine, ten
this is a very good image, best quality, masterpiece, trending
it was taken with a camera, 35mm, film, grain, bokeh, blurry background
"""


def corpus_words(corpus_lines: list[str]) -> Counter[tuple[str, ...]]:
    """Each word of the corpus, as CLIP's tokenizer splits it, as a tuple of byte-level symbols.

    The normalizer and the pre-tokenizer are the ones of transformers' ``CLIPTokenizer``, so the
    words are learnt exactly as the tokenizer will see them; the last symbol carries ``</w>``.
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus_lines:
        for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            symbols = list(word)
            symbols[-1] += END_OF_WORD
            words[tuple(symbols)] += 1
    return words


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` joined into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges(corpus_lines: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from the corpus until every corpus word is one token.

    Plain BPE: repeatedly join the most frequent adjacent pair. Ties are broken by the pair
    itself (smallest first), so the result never depends on hash order (the ``tokenizers``
    trainer breaks ties differently from one run to the next).
    """
    words = corpus_words(corpus_lines)
    merges: list[tuple[str, str]] = []
    while len(merges) < MAX_MERGES:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged[merge_word(word, best)] += count
        words = merged
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + </w>, merged tokens, then the special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    seen = set(tokens)
    for left, right in merges:
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def write_files(
    folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], **config: object
) -> int:
    """The four files of a CLIP tokenizer in ``folder`` (``config`` adds tokenizer_config
    keys); returns the vocabulary size. Also used by ``models/clip_tokenizer``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", "utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        **config,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", "utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", "utf-8")
    return len(vocab)


def write_tokenizer(folder: Path) -> int:
    """Write the tokenizer files into ``folder``; returns the vocabulary size."""
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    merges = train_merges(lines)
    return write_files(folder, build_vocab(merges), merges)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(__file__).resolve().parent
    size = write_tokenizer(out)
    logger.info("wrote a CLIP tokenizer with %d tokens to %s", size, out)
