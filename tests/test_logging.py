"""What a run shows and logs: the progress bar, TensorBoard's tags (EveryDream2's too), the log
file, and Weights & Biases offline (issues 8, 9, 12)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from tqdm import tqdm

import training.components.progress as progress
from tests.contexts import make_context, optimizer_step
from tests.e2e import ADAMW, quick_prompts, run, run_folders, scalars, write_config
from tests.group import run_forked
from training.components.progress import BAR_FORMAT, WIDTH, postfix_text, rate_text
from training.metrics import TensorBoardSink


@pytest.mark.parametrize(
    ("step", "total", "elapsed", "rate"),
    [(1, 7, 0.5, 0.0123), (123_456, 999_999, 3600 * 99, 1234.5), (10**8 - 1, 10**8, 1e6, 55.5)],
)
def test_the_progress_bar_fits_80_columns(step, total, elapsed, rate):
    postfix = postfix_text(
        epoch=99_999, max_epochs=100_000, loss=12345.678, lr=1.2345e-6, images_per_second=rate
    )
    line = tqdm.format_meter(
        step, total, elapsed, ncols=WIDTH, bar_format=BAR_FORMAT, postfix=postfix, unit="step"
    )
    assert len(line) <= WIDTH, line
    assert "0.0 img/s" not in line


def test_images_per_second_is_never_shown_as_zero():
    assert rate_text(0.0123) == "0.0123"
    assert rate_text(0.000456) == "0.000456"
    assert rate_text(7.0) == "7"
    assert rate_text(78.94) == "78.9"
    assert rate_text(1234.5) == "1234"
    assert "img/s" not in postfix_text(0, 1, None, None, 0.0)  # nothing measured yet: not shown


def test_the_bar_text_is_composed_when_it_can_be_shown_and_at_the_last_step(monkeypatch):
    """The bar redraws at most every REDRAW_SECONDS: its text is composed no more often, and
    once more at the run's last step, so that the final line is the last step's."""
    clock = [100.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    ctx = make_context()  # 10 optimizer steps
    bar = progress.ProgressBar()
    bar.on_training_start(ctx)
    shown = []
    for step in range(1, 11):
        clock[0] += 0.1 if step != 6 else progress.REDRAW_SECONDS
        bar.on_optimizer_step(ctx, optimizer_step(step, epoch=step - 1))
        shown.append(int(bar._bar.postfix.split()[1].split("/")[0]))  # "ep 6/300 ..." -> 6
    bar.close()
    assert shown == [1] * 5 + [6] * 4 + [10]


def test_tensorboard_gets_each_steps_scalars_in_one_event_read_per_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    sink.scalars({"loss/train": 0.5, "lr/unet": 1e-6}, 3)
    sink.scalars({"loss/train": 0.25}, 5)
    sink.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(3, 0.5), (5, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("lr/unet")] == [(3, pytest.approx(1e-6))]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One epoch logging every step, with samples, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("logged")
    config = write_config(
        folder,
        ADAMW,
        max_epochs=1,
        log_step=1,
        sample_prompts=quick_prompts(folder),
        sample_steps=7,
    )
    assert run(config) == 0
    (run_folder,) = run_folders(folder)
    return run_folder


@pytest.mark.parametrize(
    "tag",
    [
        "loss/log_step",
        "loss/epoch",
        "hyperparameter/lr unet",
        "hyperparameter/lr text encoder",
        "performance/images per second",
        "performance/minutes per epoch",
        "loss/train",
        "lr/unet",
    ],
)
@pytest.mark.slow
def test_tensorboard_has_everydream2s_tags_and_ours(logged_run, tag):
    assert scalars(logged_run, tag)


def test_the_log_file_holds_the_run_log(logged_run):
    text = (logged_run / "train.log").read_text()
    assert "run folder:" in text and "checkpoint written to" in text


@pytest.mark.slow
def test_log_lines_never_glue_onto_the_progress_bar(tmp_path):
    result = run_forked(write_config(tmp_path, ADAMW, max_epochs=1, save_every_n_epochs=1))
    assert result.returncode == 0
    segments = re.split(r"[\r\n]", result.stderr)
    logged = [s for s in segments if re.search(r"\b(INFO|WARNING|ERROR) [a-z_.]+:", s)]
    assert logged
    assert all(re.match(r"\s*(INFO|WARNING|ERROR) ", s) for s in logged), logged


@pytest.mark.slow
def test_wandb_logs_the_same_scalars_and_samples_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb.sdk.wandb_run

    logged: dict[str, list[int]] = {}
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        for key in data:
            logged.setdefault(key, []).append(step)
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    config = write_config(
        tmp_path,
        ADAMW,
        max_epochs=1,
        log_step=1,
        wandb=True,
        sample_prompts=quick_prompts(tmp_path),
        sample_steps=7,
    )
    assert run(config) == 0
    for tag in ("loss/train", "loss/log_step", "hyperparameter/lr unet", "loss/epoch", "samples/0"):
        assert tag in logged, sorted(logged)
    assert logged["loss/train"] == list(range(1, 8))
    (run_folder,) = run_folders(tmp_path)
    (offline,) = (run_folder / "wandb").glob("offline-run-*")
    assert list((offline / "files" / "media" / "images").rglob("*.png"))
