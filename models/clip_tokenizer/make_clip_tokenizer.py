"""Regenerate the real CLIP tokenizer kept in this folder (SD1.x and SD2.x use the same one).

    .venv/bin/python models/clip_tokenizer/make_clip_tokenizer.py [bpe_simple_vocab_16e6.txt.gz]

Single-file checkpoints (``.safetensors``, ``.ckpt``) carry no tokenizer and nothing may be
downloaded from a model hub, so the tokenizer of OpenAI's CLIP ViT-L/14 (the one every Stable
Diffusion 1.x and 2.x model uses, 49,408 tokens) is kept here. It derives exactly from OpenAI's
BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, see ``LICENSE``), which the
``open_clip_torch`` package on PyPI ships; without an argument this script fetches that package
with ``pip download`` and reads the file from it. The files written follow OpenAI's
``simple_tokenizer``:

- ``vocab.json``: the 256 byte-level symbols, the same 256 with ``</w>``, the first
  49152 - 256 - 2 merges joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407);
- ``merges.txt``: ``#version: 0.2`` then those merges, one a line;
- ``tokenizer_config.json`` and ``special_tokens_map.json``: as in the ``tokenizer/`` folder of
  the Stable Diffusion 1.x diffusers folders (bos ``<|startoftext|>``, eos, pad and unk
  ``<|endoftext|>``, ``model_max_length`` 77). SD2.x's folders differ only in the pad token
  (``!``, id 0); `models.single_file.clip_tokenizer` passes that when it loads the tokenizer.

The output is deterministic: running the script again writes the same files.
"""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from models.tokenizer.make_tokenizer import BOS, END_OF_WORD, EOS, write_files

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The PyPI package (and version) whose wheel holds BPE_FILE.
PACKAGE = "open_clip_torch==3.3.0"


def read_merges(bpe_file: Path) -> list[tuple[str, str]]:
    """The merges of OpenAI's BPE file that CLIP uses (its first line is a header)."""
    with gzip.open(bpe_file) as file:
        lines = file.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    assert all(len(merge) == 2 for merge in merges), "unexpected line in the BPE file"
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's order: bytes, bytes + </w>, one token per merge, then the special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += [left + right for left, right in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, f"{len(vocab)} distinct tokens, expected {VOCAB_SIZE}"
    return vocab


def write_tokenizer(bpe_file: Path, folder: Path) -> int:
    """Write the tokenizer files into ``folder``; returns the vocabulary size."""
    merges = read_merges(bpe_file)
    return write_files(
        folder, build_vocab(merges), merges, add_prefix_space=False, errors="replace"
    )


def download_bpe_file(folder: Path) -> Path:
    """Fetch the open_clip_torch wheel from PyPI with pip and extract the BPE file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", str(folder)],
        check=True,
    )
    (wheel,) = folder.glob("open_clip_torch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        target = folder / BPE_FILE
        target.write_bytes(archive.read(f"open_clip/{BPE_FILE}"))
    return target


def main(argv: list[str]) -> None:
    out = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as scratch:
        bpe_file = Path(argv[0]) if argv else download_bpe_file(Path(scratch))
        size = write_tokenizer(bpe_file, out)
    logger.info("wrote the CLIP tokenizer (%d tokens) to %s", size, out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
