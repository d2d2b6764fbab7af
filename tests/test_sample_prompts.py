"""Reading sample_prompts (.txt / EveryDream2 .json) at start-up, before any model loads."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import ConfigError, UserError
from training.samples import (
    DEFAULT_SCHEDULER,
    SampleRequest,
    load_sample_prompts,
    load_sample_settings,
    size_for_aspect_ratio,
)
from training.samples.settings import DEFAULT_CFGS, random_caption_count

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, data: object) -> Path:
    return write(tmp_path, "sample_prompts.json", json.dumps(data, indent=2))


def load(path: Path, resolution: int = 512, seed: int = 555, batch_size: int = 2):
    return load_sample_settings(path, resolution, seed, batch_size=batch_size)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def at_scales(request: SampleRequest, scales=DEFAULT_CFGS) -> list[SampleRequest]:
    return [SampleRequest(**{**request.__dict__, "guidance_scale": s}) for s in scales]


# --- .txt ----------------------------------------------------------------------------------


def test_txt_one_prompt_a_line_at_everydream2s_guidance_scales(tmp_path: Path) -> None:
    path = write(
        tmp_path, "prompts.txt", "\ufeff# my prompts\n a photo of ted \n\n#x\nted, smiling\n"
    )
    requests = load_sample_prompts(path, 512, 42, batch_size=2)
    assert DEFAULT_CFGS == (7.0, 4.0, 1.01)  # EveryDream2's SampleGenerator.cfgs
    assert requests == [
        *at_scales(SampleRequest("a photo of ted", seed=42, width=512, height=512)),
        *at_scales(SampleRequest("ted, smiling", seed=42, width=512, height=512)),
    ]
    assert all(r.num_inference_steps == 30 for r in requests)
    assert load(path).scheduler == "ddim"


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"])
@pytest.mark.parametrize(("batch_size", "count"), [(1, 1), (2, 1), (6, 3), (8, 4), (64, 4)])
def test_txt_without_prompts_samples_random_training_captions(
    tmp_path: Path, text: str, batch_size: int, count: int
) -> None:
    # EveryDream2 ships an empty sample_prompts.txt: min(4, batch_size // 2) random captions.
    path = write(tmp_path, "prompts.txt", text)
    assert random_caption_count(batch_size) == count
    settings = load(path, 256, 9, batch_size)
    base = SampleRequest("", seed=9, width=256, height=256)
    assert list(settings.requests) == [
        request
        for index in range(count)
        for request in at_scales(SampleRequest(**{**base.__dict__, "caption_index": index}))
    ]


def test_shipped_everydream2_sample_prompts_txt_is_read(tmp_path: Path) -> None:
    shipped = Path("/work/shared/reference/everydream2/sample_prompts.txt")
    if not shipped.exists():
        pytest.skip("EveryDream2's reference files are not here")
    requests = load(shipped, batch_size=4).requests
    assert {r.caption_index for r in requests} == {0, 1}


def test_txt_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a photo of ted\nted \xff\xfe smiling\n")
    with pytest.raises(UserError, match=r"line 2: not UTF-8"):
        load(path)


def test_txt_control_characters_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.txt", "a photo\tof ted\nted\x00 smiling\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert "line 2: holds the control character '\\x00'" in problems[0]


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        load(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "nope.json")
    path = write(tmp_path, "prompts.yaml", "a photo of ted\n")
    with pytest.raises(UserError, match=r"unknown file type '\.yaml'.*\.txt.*\.json"):
        load(path)


# --- .json ---------------------------------------------------------------------------------

EVERYDREAM2_EXAMPLE = {
    "batch_size": 3,
    "seed": 555,
    "cfgs": [7, 4],
    "scheduler": "dpm++",
    "num_inference_steps": 15,
    "show_progress_bars": True,
    "generate_samples_every_n_steps": 200,
    "generate_pretrain_samples": True,
    "samples": [
        {"prompt": "ted on a sofa", "negative_prompt": "distorted, deformed"},
        {"prompt": "ted riding a bicycle", "seed": -1, "aspect_ratio": 1.77778},
        {"random_caption": True, "size": [640, 384], "cfg": 3.5},
    ],
}


def test_json_everydream2_format(tmp_path: Path) -> None:
    settings = load(write_json(tmp_path, EVERYDREAM2_EXAMPLE), 512, 1)
    assert settings.scheduler == "dpm++"
    assert settings.every_n_steps == 200
    assert settings.every_n_epochs is None
    assert settings.pretrain is True
    assert settings.show_progress_bars is True
    common = {"num_inference_steps": 15}
    assert settings.requests == (
        SampleRequest("ted on a sofa", "distorted, deformed", 555, 512, 512, 7.0, **common),
        SampleRequest("ted on a sofa", "distorted, deformed", 555, 512, 512, 4.0, **common),
        SampleRequest("ted riding a bicycle", "", -1, 704, 384, 7.0, **common),
        SampleRequest("ted riding a bicycle", "", -1, 704, 384, 4.0, **common),
        SampleRequest("", "", 555, 640, 384, 3.5, caption_index=0, **common),
    )


def test_everydream2_shipped_sample_prompts_json() -> None:
    shipped = Path("/work/shared/reference/everydream2/sample_prompts.json")
    if not shipped.exists():
        pytest.skip("EveryDream2's reference files are not here")
    settings = load(shipped)
    assert settings.scheduler == "dpm++"
    assert len(settings.requests) == 6  # 2 prompts x cfgs [7, 4] + a random caption x [1, 11]


def test_json_defaults_come_from_the_run_and_everydream2(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"samples": [{"prompt": "ted"}]})
    settings = load(path, 256, 9)
    assert settings.scheduler == DEFAULT_SCHEDULER
    assert settings.every_n_steps is None
    assert settings.pretrain is False
    assert list(settings.requests) == at_scales(SampleRequest("ted", seed=9, width=256, height=256))
    path = write_json(tmp_path, {"resolution": 320, "samples": [{"prompt": "ted"}]})
    assert load(path, 256, 9).requests[0].width == 320


@pytest.mark.parametrize("data", [{}, {"samples": []}, {"samples": None}, {"seed": 5}])
def test_json_without_samples_uses_random_captions(tmp_path: Path, data: dict) -> None:
    settings = load(write_json(tmp_path, {**data, "cfgs": [6]}), 256, 9, batch_size=4)
    seed = data.get("seed", 9)
    assert settings.requests == (
        SampleRequest("", seed=seed, width=256, height=256, guidance_scale=6, caption_index=0),
        SampleRequest("", seed=seed, width=256, height=256, guidance_scale=6, caption_index=1),
    )


def test_json_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    data = {"sheduler": "ddim", "samples": [{"prompt": "ted", "negativ_prompt": "blurry"}]}
    problems = problems_of(write_json(tmp_path, data))
    assert len(problems) == 2
    assert "sheduler: unknown key (did you mean 'scheduler'?)" in problems[0]
    assert "samples[0].negativ_prompt" in problems[1]
    assert "did you mean 'negative_prompt'?" in problems[1]
    assert all(str(tmp_path / "sample_prompts.json") in p for p in problems)


def test_json_size_must_be_multiples_of_8(tmp_path: Path) -> None:
    data = {"samples": [{"prompt": "ted", "size": [512, 500]}, {"prompt": "x", "size": [64]}]}
    problems = problems_of(write_json(tmp_path, data))
    assert len(problems) == 2
    assert "samples[0].size[1]: must be a multiple of 8, got 500" in problems[0]
    assert "samples[1].size: expected a list of 2 numbers" in problems[1]
    path = write_json(tmp_path, {"resolution": 100, "samples": [{"prompt": "ted"}]})
    assert "resolution: must be a multiple of 8" in problems_of(path)[0]


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", '{\n  "seed": 555,\t# a comment\n  "samples": []\n}\n')
    with pytest.raises(UserError, match=r"s\.json: invalid JSON at line 2, column 16"):
        load(path)


def test_json_bad_values_are_all_reported(tmp_path: Path) -> None:
    data = {
        "seed": "x",
        "cfgs": [],
        "num_inference_steps": 0,
        "show_progress_bars": "yes",
        "generate_samples_every_n_steps": 1.5,
        "samples": [
            {"prompt": "a", "size": [64, 64], "aspect_ratio": 1.5},
            {"prompt": "b", "random_caption": True},
            {"negative_prompt": "c"},
            {"prompt": "d", "cfg": 7, "cfgs": [7]},
            {"prompt": "e", "seed": -2, "aspect_ratio": 9, "cfgs": [7, -1]},
            "f",
        ],
    }
    problems = problems_of(write_json(tmp_path, data))
    expected = [
        "seed: expected a whole number",
        "cfgs: expected a list of at least 1 item",
        "num_inference_steps: must be >= 1",
        "show_progress_bars: expected true or false",
        "generate_samples_every_n_steps: expected a whole number",
        "samples[0]: give either 'size' or 'aspect_ratio', not both",
        "samples[1]: give either 'prompt' or 'random_caption': true, not both",
        "samples[2]: missing 'prompt' (or 'random_caption': true)",
        "samples[3]: give either 'cfg' or 'cfgs', not both",
        "samples[4].seed: must be >= -1, got -2",
        "samples[4].aspect_ratio: must be <= 4, got 9",
        "samples[4].cfgs[1]: must be >= 0, got -1",
        "samples[5]: expected an object",
    ]
    assert len(problems) == len(expected)
    for text in expected:
        assert sum(f"sample_prompts.json: {text}" in problem for problem in problems) == 1, text


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"seed": 2**32}, "seed: must be <= 4294967295, got 4294967296"),
        ({"seed": 1e30}, "seed: must be <= 4294967295, got 1e+30"),
        ({"num_inference_steps": 10**12}, "num_inference_steps: must be <= 1000"),
        ({"resolution": 10**12}, "resolution: must be <= 8192"),
        ({"cfgs": [7, float("inf")]}, "cfgs[1]: expected a finite number (>= 0; <= 100), got Inf"),
        ({"cfgs": [float("nan")]}, "cfgs[0]: expected a finite number"),
        ({"generate_samples_every_n_steps": 10**18}, "must be <= 100000000"),
        ({"generate_samples_every_n_epochs": 0}, "generate_samples_every_n_epochs: must be >= 1"),
    ],
)
def test_json_numbers_are_finite_and_bounded(tmp_path: Path, data: dict, fragment: str) -> None:
    problems = problems_of(write_json(tmp_path, {**data, "samples": [{"prompt": "ted"}]}))
    assert len(problems) == 1
    assert fragment in problems[0]


@pytest.mark.parametrize(
    ("sample", "fragment"),
    [
        ({"prompt": "ted", "size": [640, 10**9]}, "size[1]: must be <= 8192"),
        ({"prompt": "ted", "size": [32, 64]}, "size[0]: must be >= 64"),
        ({"prompt": "ted", "cfg": float("-inf")}, "cfg: expected a finite number"),
        ({"prompt": "ted", "aspect_ratio": float("nan")}, "aspect_ratio: expected a finite"),
        ({"prompt": "ted", "seed": 1.5}, "seed: expected a whole number"),
    ],
)
def test_json_sample_numbers_are_finite_and_bounded(
    tmp_path: Path, sample: dict, fragment: str
) -> None:
    problems = problems_of(write_json(tmp_path, {"samples": [sample]}))
    assert len(problems) == 1
    assert fragment in problems[0]


def test_json_infinity_written_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", '{"cfgs": [Infinity], "samples": [{"prompt": "a"}]}')
    assert "cfgs[0]: expected a finite number" in problems_of(path)[0]


def test_whole_numbers_written_as_floats_are_whole_numbers(tmp_path: Path) -> None:
    data = {"num_inference_steps": 20.0, "samples": [{"prompt": "ted", "seed": 7.0}]}
    request = load(write_json(tmp_path, data)).requests[0]
    assert (request.num_inference_steps, request.seed) == (20, 7)


@pytest.mark.parametrize(
    ("key", "text", "fragment"),
    [
        ("prompt", "ted \udcff smiling", "lone surrogate"),
        ("negative_prompt", "blurry\ud800", "lone surrogate"),
        ("prompt", "ted\x00", "control character '\\x00'"),
        ("negative_prompt", "a\x1bb", "control character '\\x1b'"),
    ],
)
def test_prompts_the_tokenizer_cannot_take_are_refused_at_start_up(
    tmp_path: Path, key: str, text: str, fragment: str
) -> None:
    # A lone surrogate can only come from a \udcxx escape in JSON; the tokenizer fails on it.
    sample = {"prompt": "ted", key: text}
    problems = problems_of(write_json(tmp_path, {"samples": [sample]}))
    assert len(problems) == 1
    assert f"samples[0].{key}: " in problems[0]
    assert fragment in problems[0]


def test_prompts_that_pass_are_tokenizable(tmp_path: Path) -> None:
    from models.builtin import load_builtin_tokenizer
    from models.text import tokenize

    prompts = ["a\tb\nc", "😀 emoji", "\u200b", "x" * 5000, "\ufffe", "\U0010ffff", ""]
    data = {"samples": [{"prompt": p, "negative_prompt": p} for p in prompts]}
    requests = load(write_json(tmp_path, data)).requests
    tokenizer = load_builtin_tokenizer()
    for request in requests:
        assert tokenize(tokenizer, [request.prompt, request.negative_prompt]).shape[0] == 2


def test_json_scheduler_names(tmp_path: Path) -> None:
    problems = problems_of(
        write_json(tmp_path, {"scheduler": "eulr_a", "samples": [{"prompt": "a"}]})
    )
    assert 'scheduler: "eulr_a" is not one of: ddim, ddpm' in problems[0]
    assert "(did you mean 'euler_a'?)" in problems[0]
    for name in ("ddim", "euler_a", "dpm++_2m_k", "unipc"):
        path = write_json(tmp_path, {"scheduler": name, "samples": [{"prompt": "a"}]})
        assert load(path).scheduler == name


@pytest.mark.skipif(importlib.util.find_spec("scipy") is not None, reason="scipy is installed")
def test_scheduler_needing_a_missing_package_says_which(tmp_path: Path) -> None:
    problems = problems_of(write_json(tmp_path, {"scheduler": "lms", "samples": [{"prompt": "a"}]}))
    assert "scheduler 'lms' needs the Python package 'scipy'" in problems[0]


def test_json_everydream2_keys_without_meaning_here_are_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"batch_size": 8, "external_gen_enabled": False, "samples": [{"prompt": "ted"}]}
    with caplog.at_level(logging.INFO, logger="training.samples"):
        requests = load(write_json(tmp_path, data)).requests
    assert {r.prompt for r in requests} == {"ted"}
    assert "'batch_size' is ignored" in caplog.text
    assert "'external_gen_enabled' is ignored" in caplog.text


def test_size_for_aspect_ratio_matches_everydream2() -> None:
    assert size_for_aspect_ratio(1.0, 512) == (512, 512)
    assert size_for_aspect_ratio(1.77778, 512) == (704, 384)
    assert size_for_aspect_ratio(0.5, 512) == (384, 704)
    assert size_for_aspect_ratio(4.0, 64) == (128, 64)


@pytest.mark.slow
def test_reading_sample_prompts_loads_no_model_library(tmp_path: Path) -> None:
    path = write_json(tmp_path, EVERYDREAM2_EXAMPLE)
    code = (
        "import sys; from pathlib import Path;"
        "from training.samples.prompts import load_sample_prompts;"
        f"assert len(load_sample_prompts(Path({str(path)!r}), 512, 1, batch_size=2)) == 5;"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
