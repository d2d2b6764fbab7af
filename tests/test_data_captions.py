"""Captions and folder files (docs/data.md): sources, precedence, folder settings, bad sidecars."""

from __future__ import annotations

import logging

import pytest

from config.errors import UserError
from tests.data_fixtures import captions_by_name, load, record, write_image


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
        "d.png": "from yaml, big, red",  # heavier tags first, even without shuffling
        "e.png": "from yml",
    }
    d = record(dataset, "d.png")
    assert d.parts == ("from yaml", "big", "red")
    assert d.weights == (1.0, 2.0, 1.0)
    assert record(dataset, "b.png").caption_source == "b.txt"
    assert record(dataset, "plain name.png").caption_source == "file name"


def test_all_caption_files_merge_in_everydream2_order(tmp_path, caplog):
    # EveryDream2 merges .yaml, .yml, .caption and .txt: the first main prompt in that order is
    # the caption's, the tags of all of them follow in that order (the other main prompts are
    # not used, with a warning)
    write_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("txt main, txt tag", "utf-8")
    (tmp_path / "x.caption").write_text("caption main, caption tag", "utf-8")
    (tmp_path / "x.yaml").write_text("main_prompt: yaml main\ntags: [yaml tag]\n", "utf-8")
    write_image(tmp_path / "y.png")
    (tmp_path / "y.txt").write_text("txt main, from txt", "utf-8")
    (tmp_path / "y.caption").write_text("caption main, from caption", "utf-8")
    write_image(tmp_path / "z.png")
    (tmp_path / "z.yaml").write_text("tags: [only tags]\n", "utf-8")
    (tmp_path / "z.txt").write_text("main from txt", "utf-8")
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert captions_by_name(dataset) == {
        "x.png": "yaml main, yaml tag, caption tag, txt tag",
        "y.png": "caption main, from caption, from txt",
        "z.png": "main from txt, only tags",
    }
    assert record(dataset, "x.png").caption_source == "x.yaml + x.caption + x.txt"
    assert "more than one main prompt: the first is used" in caplog.text
    assert "(2 file(s), e.g." in caplog.text


def test_yaml_caption_as_text_or_mapping(tmp_path):
    write_image(tmp_path / "text.png")
    (tmp_path / "text.yaml").write_text("caption: a cat, sitting, indoors\n", "utf-8")
    write_image(tmp_path / "mapping.png")
    (tmp_path / "mapping.yaml").write_text(
        "caption:\n  main_prompt: a dog\n  tags:\n    - running\n    - tag: happy\n"
        "      weight: 3\n  flip_p: 1.0\ntags: [outer tag]\n",
        "utf-8",
    )
    write_image(tmp_path / "both.png")
    (tmp_path / "both.yaml").write_text(
        "main_prompt: not used\ncaption: caption wins, c tag\ntags: [t]\n", "utf-8"
    )
    dataset = load(tmp_path)
    assert captions_by_name(dataset) == {
        "text.png": "a cat, sitting, indoors",
        "mapping.png": "a dog, happy, running, outer tag",
        "both.png": "caption wins, c tag, t",
    }
    assert record(dataset, "mapping.png").flip_p == 1.0


def test_weighted_tags_come_first_without_shuffling(tmp_path):
    # SHUFFLING_TAGS.md's example; equal weights keep their order (a stable sort)
    write_image(tmp_path / "cloud.png")
    (tmp_path / "cloud.yaml").write_text(
        "main_prompt: A portrait of Cloud Strife\ntags:\n  - tag: low angle shot\n"
        "  - tag: looking to the side\n  - tag: holding buster sword\n    weight: 1.5\n"
        "  - tag: clouds in background\n    weight: 0.5\n  - tag: smiling\n    weight: 0.8\n",
        "utf-8",
    )
    assert captions_by_name(load(tmp_path)) == {
        "cloud.png": "A portrait of Cloud Strife, holding buster sword, low angle shot, "
        "looking to the side, smiling, clouds in background"
    }


def test_file_name_caption_is_split_into_tags(tmp_path):
    write_image(tmp_path / "a woman, red hair, smiling_3.png")
    (tmp_path / "local.yaml").write_text("tags: [folder tag]\n", "utf-8")
    image = record(load(tmp_path), "a woman, red hair, smiling_3.png")
    assert image.parts == ("a woman", "red hair", "smiling", "folder tag")
    assert image.caption == "a woman, red hair, smiling, folder tag"


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
        ("main_prompt: x\ntags: {tag: red}\n", "tags: must be a list"),
        ("main_prompt: x\ntags:\n  - tag: red\n    weight: -1\n", "tags[0].weight: must be > 0"),
        ("main_prompt: x\ntags:\n  - [3]\n", "each tag must be a string"),
        ("main_prompt: 5\n", "main_prompt: expected a string, got 5"),
        (
            "main_prompt: x\nmultiply: lots\n",
            'multiply: expected a number (>= 0; <= 10000), got "lots"',
        ),
        ("main_prompt: x\nflip_p: 2\n", "flip_p: must be <= 1, got 2"),
        ("main_prompt: x\nloss_scale: -1\n", "loss_scale: must be >= 0, got -1"),
        ("main_prompt: x\nmultiply: 1e12\n", "multiply: must be <= 10000, got 1000000000000"),
        ("main_prompt: x\nbatch_id: [a]\n", "batch_id: expected a string"),
        ("main_prompt: x\nrating: -2\n", "rating: must be >= 0"),
        ("main_prompt: x\nmax_caption_length: 0\n", "max_caption_length: must be >= 1"),
        ("main_prompt: x\nshuffle_tags: maybe\n", "shuffle_tags: expected true or false"),
        ('main_prompt: "\\ud800"\n', "not valid"),
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


def test_unknown_key_in_an_image_yaml_warns_with_the_closest_key_and_trains_it(tmp_path, caplog):
    # DATA.md's own example has the typo cond_droput
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.yaml").write_text(
            "main_prompt: a photo of ted bennet\ntags:\n  - sitting on a green armchair\n"
            "multiply: 2\nflip_p: 0.5\ncond_droput: 0.05\n",
            "utf-8",
        )
    write_image(tmp_path / "c.png")
    (tmp_path / "c.yaml").write_text(
        "main_prompt: c\ntags:\n  - tga: misspelt\n  - tag: kept\n    wieght: 2\n", "utf-8"
    )
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path, cond_dropout=0.1)
    assert len(dataset.images) == 3 and dataset.skipped == []
    a = record(dataset, "a.png")
    assert (a.multiply, a.flip_p, a.cond_dropout) == (2.0, 0.5, 0.1)
    assert a.caption == "a photo of ted bennet, sitting on a green armchair"
    assert record(dataset, "c.png").caption == "c, kept"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    [typo] = [w for w in warnings if "cond_droput" in w]
    assert "cond_droput: unknown key (did you mean 'cond_dropout'?)" in typo
    assert "(2 file(s), e.g. " in typo
    assert any("tags[0].tga: unknown key (did you mean 'tag'?)" in w for w in warnings)
    assert any("tags[1].wieght: unknown key (did you mean 'weight'?)" in w for w in warnings)


def test_rating_without_rated_dataset_is_said_not_ignored(tmp_path, caplog):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.yaml").write_text(f"main_prompt: {name}\nrating: 2\n", "utf-8")
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert len(dataset.images) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"rating is used only with rated_dataset: true (2 file(s), e.g. {tmp_path / 'a.png'})"
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
        ("multiply.txt", "-1", "multiply: must be >= 0, got -1"),
        ("multiply.txt", "1e12", "multiply: must be <= 10000, got 1000000000000"),
        (
            "multiply.txt",
            "inf",
            "multiply: expected a finite number (>= 0; <= 10000), got Infinity",
        ),
        ("multiply.txt", "", "must hold one number"),
        ("flip_p.txt", "1.5", "flip_p: must be <= 1, got 1.5"),
        ("cond_dropout.txt", "nan", "cond_dropout: expected a finite number (>= 0; <= 1), got NaN"),
        ("loss_scale.txt", "1e9", "loss_scale: must be <= 1000, got 1000000000"),
        ("loss_scale.txt", "heavy", "loss_scale: must hold one number"),
        ("batch_id.txt", "x" * 201, "batch_id: at most 200 characters, got 201"),
        ("shuffle_tags.txt", "sometimes", "shuffle_tags: expected an empty file, true or false"),
        ("local.yaml", "tags: [a\n", "not valid YAML"),
        ("global.yaml", "multipy: 2\n", "did you mean 'multiply'"),
        ("local.yaml", "multiply: -2\n", "multiply: must be >= 0"),
        ("local.yaml", "tags:\n  - tga: x\n", "tags[0].tga: unknown key"),
        ("local.yaml", "rating: 1e7\n", "rating: must be <= 1000000"),
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
