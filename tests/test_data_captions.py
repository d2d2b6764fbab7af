"""Captions and folder files (SPEC §8): sources, precedence, folder settings, bad sidecars."""

from __future__ import annotations

import logging

import pytest
from data_fixtures import captions_by_name, load, record, write_image

from config.errors import UserError


def test_each_caption_source(tmp_path):
    write_image(tmp_path / "a photo of ted_2.jpg")
    write_image(tmp_path / "plain name.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  from txt, tag one  \n", "utf-8")
    write_image(tmp_path / "c.png")
    (tmp_path / "c.caption").write_text("from caption file", "utf-8")
    write_image(tmp_path / "d.png")
    (tmp_path / "d.yaml").write_text(
        "main_prompt: from yaml\ntags:\n  - red\n  - tag: big\n    weight: 2\n", "utf-8"
    )
    write_image(tmp_path / "e.png")
    (tmp_path / "e.yml").write_text("main_prompt: from yml\n", "utf-8")
    dataset = load(tmp_path)
    assert captions_by_name(dataset) == {
        "a photo of ted_2.jpg": "a photo of ted",
        "plain name.png": "plain name",
        "b.png": "from txt, tag one",
        "c.png": "from caption file",
        "d.png": "from yaml, red, big",
        "e.png": "from yml",
    }
    d = record(dataset, "d.png")
    assert d.parts == ("from yaml", "red", "big")
    assert d.weights == (1.0, 1.0, 2.0)
    assert record(dataset, "b.png").caption_source == "b.txt"
    assert record(dataset, "plain name.png").caption_source == "file name"


def test_first_sidecar_found_wins(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.yaml").write_text("main_prompt: yaml wins\n", "utf-8")
    (tmp_path / "x.txt").write_text("txt loses", "utf-8")
    (tmp_path / "x.caption").write_text("caption loses", "utf-8")
    write_image(tmp_path / "y.png")
    (tmp_path / "y.txt").write_text("txt wins", "utf-8")
    (tmp_path / "y.caption").write_text("caption loses", "utf-8")
    assert captions_by_name(load(tmp_path)) == {"x.png": "yaml wins", "y.png": "txt wins"}


def test_bom_dropped_and_raw_text_kept(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("\ufeffcafé,au lait\r\n".encode())
    image = record(load(tmp_path), "x.png")
    assert image.caption == "café,au lait"
    assert image.parts == ("café", "au lait")


def test_empty_caption_file_falls_back_to_file_name(tmp_path, caplog):
    write_image(tmp_path / "a cat_1.png")
    (tmp_path / "a cat_1.txt").write_text("  \n", "utf-8")
    with caplog.at_level(logging.WARNING):
        assert captions_by_name(load(tmp_path)) == {"a cat_1.png": "a cat"}
    assert "empty" in caplog.text


def test_non_utf8_caption_skips_the_image(tmp_path):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    [skipped] = dataset.skipped
    assert skipped["path"].endswith("latin.png")
    assert "latin.txt" in skipped["reason"] and "UTF-8" in skipped["reason"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("main_prompt: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("main_prompt: x\ntags: red\nmain_promt: y\n", "did you mean 'main_prompt'"),
        ("main_prompt: x\ntags: {tag: red}\n", "tags: must be a list"),
        (
            "main_prompt: x\ntags:\n  - tag: red\n    weight: -1\n",
            "weight must be a number above 0",
        ),
        ("main_prompt: x\ntags:\n  - 3\n", "each tag must be a string"),
        ("main_prompt: 5\n", "main_prompt: must be text"),
        ("main_prompt: x\nmultiply: lots\n", "multiply: must be a number"),
        ("main_prompt: x\nflip_p: 2\n", "flip_p: must be between 0 and 1"),
    ],
)
def test_bad_yaml_sidecar_skips_the_image(tmp_path, text, expected):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / "bad.png")
    (tmp_path / "bad.yaml").write_text(text, "utf-8")
    dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    [skipped] = dataset.skipped
    assert "bad.yaml" in skipped["reason"]
    assert expected in skipped["reason"]


def test_everydream2_keys_are_ignored_with_one_warning(tmp_path, caplog):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.yaml").write_text(f"main_prompt: {name}\nrating: 2\n", "utf-8")
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert len(dataset.images) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "2 image yaml file(s) set 'rating', which this trainer ignores"
    ]


def test_folder_tags_append_and_nest(tmp_path):
    (tmp_path / "global.yaml").write_text("tags: [everywhere]\n", "utf-8")
    write_image(tmp_path / "top.png")
    sub = tmp_path / "sub"
    write_image(sub / "x.png")
    (sub / "x.txt").write_text("own caption, own tag", "utf-8")
    (sub / "local.yaml").write_text("tags:\n  - sub only\n  - own tag\n", "utf-8")
    write_image(sub / "deeper" / "y.png")
    (sub / "deeper" / "global.yaml").write_text("tags: [deep]\n", "utf-8")
    dataset = load(tmp_path)
    assert captions_by_name(dataset) == {
        "top.png": "top, everywhere",
        # local.yaml: this folder only; a tag already present is not repeated
        "x.png": "own caption, own tag, sub only, everywhere",
        # nearest global.yaml first, local.yaml of the parent does not apply
        "y.png": "y, deep, everywhere",
    }


def test_folder_main_prompt_replaces_the_file_name_only(tmp_path):
    (tmp_path / "local.yaml").write_text("main_prompt: folder prompt\n", "utf-8")
    write_image(tmp_path / "by name_1.png")
    write_image(tmp_path / "own.png")
    (tmp_path / "own.txt").write_text("own caption", "utf-8")
    assert captions_by_name(load(tmp_path)) == {
        "by name_1.png": "folder prompt",
        "own.png": "own caption",
    }


def test_each_folder_number_file(tmp_path):
    write_image(tmp_path / "plain.png")
    folder = tmp_path / "special"
    write_image(folder / "x.png")
    (folder / "multiply.txt").write_text("2.5\n", "utf-8")
    (folder / "flip_p.txt").write_text("0.25", "utf-8")
    (folder / "cond_dropout.txt").write_text("\ufeff 0.75 ", "utf-8")
    write_image(folder / "child" / "z.png")
    dataset = load(tmp_path, flip_p=0.5, cond_dropout=0.1)
    plain, x, z = (record(dataset, n) for n in ("plain.png", "x.png", "z.png"))
    assert (plain.multiply, plain.flip_p, plain.cond_dropout) == (1.0, 0.5, 0.1)
    assert (x.multiply, x.flip_p, x.cond_dropout) == (2.5, 0.25, 0.75)
    # the .txt files are "this folder" only
    assert (z.multiply, z.flip_p, z.cond_dropout) == (1.0, 0.5, 0.1)


def test_precedence_image_yaml_over_local_over_global_over_settings(tmp_path):
    root = tmp_path / "root"
    write_image(root / "only_global.png")
    (root / "global.yaml").write_text("flip_p: 0.2\ncond_dropout: 0.3\n", "utf-8")
    sub = root / "sub"
    write_image(sub / "local_and_global.png")
    (sub / "local.yml").write_text("flip_p: 0.4\n", "utf-8")
    write_image(sub / "image_yaml.png")
    (sub / "image_yaml.yaml").write_text("main_prompt: x\nflip_p: 0.6\nmultiply: 3\n", "utf-8")
    other = root / "other"
    write_image(other / "zero.png")
    (other / "local.yaml").write_text("flip_p: 0.0\n", "utf-8")  # 0.0 is a real value
    dataset = load(root, flip_p=0.9, cond_dropout=0.8)
    values = {i.path.name: (i.flip_p, i.cond_dropout, i.multiply) for i in dataset.images}
    assert values == {
        "only_global.png": (0.2, 0.3, 1.0),
        "local_and_global.png": (0.4, 0.3, 1.0),
        "image_yaml.png": (0.6, 0.3, 3.0),
        "zero.png": (0.0, 0.3, 1.0),
    }
    write_image(tmp_path / "no_folder_files" / "x.png")
    plain = load(tmp_path / "no_folder_files", flip_p=0.9, cond_dropout=0.8).images[0]
    assert (plain.flip_p, plain.cond_dropout, plain.multiply) == (0.9, 0.8, 1.0)


@pytest.mark.parametrize(
    ("file_name", "text", "expected"),
    [
        ("multiply.txt", "abc", "multiply: must hold one number, got 'abc'"),
        ("multiply.txt", "-1", "multiply: must be 0 or more"),
        ("multiply.txt", "", "must hold one number"),
        ("flip_p.txt", "1.5", "flip_p: must be between 0 and 1"),
        ("cond_dropout.txt", "nan", "cond_dropout: must be a number"),
        ("local.yaml", "tags: [a\n", "not valid YAML"),
        ("global.yaml", "multipy: 2\n", "did you mean 'multiply'"),
        ("local.yaml", "multiply: -2\n", "multiply: must be 0 or more"),
    ],
)
def test_bad_folder_file_is_a_user_error_naming_it(tmp_path, file_name, text, expected):
    write_image(tmp_path / "sub" / "x.png")
    (tmp_path / "sub" / file_name).write_text(text, "utf-8")
    with pytest.raises(UserError) as error:
        load(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "sub" / file_name) in message
    assert expected in message


def test_folder_number_set_twice_is_a_user_error(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "multiply.txt").write_text("2", "utf-8")
    (tmp_path / "local.yaml").write_text("multiply: 3\n", "utf-8")
    with pytest.raises(UserError, match=r"multiply is also set in .*local\.yaml"):
        load(tmp_path)


def test_folder_files_are_not_image_sidecars(tmp_path):
    # an image called "local.png" must not take the folder's local.yaml as its own caption
    write_image(tmp_path / "local.png")
    (tmp_path / "local.yaml").write_text("tags: [folder tag]\n", "utf-8")
    assert captions_by_name(load(tmp_path)) == {"local.png": "local, folder tag"}
