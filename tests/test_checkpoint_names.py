"""Checkpoint names are claimed atomically: runs saving into one folder never lose a checkpoint."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from storage.atomic import atomic_folder
from training.checkpointing.names import CLAIM_FILE, claim_path, claimed_by

SAVES = 12


def _is_ours(run_id: str):
    def check(path: Path) -> bool:
        note = path / "note.json"
        if note.is_file():
            return json.loads(note.read_text())["run"] == run_id
        return claimed_by(path) == run_id

    return check


def test_a_name_claimed_by_one_run_is_not_free_for_another_before_it_is_written(tmp_path):
    first = claim_path(tmp_path, "proj-ep01-gs00007", "run-a", _is_ours("run-a"))
    assert first == tmp_path / "proj-ep01-gs00007" and claimed_by(first) == "run-a"
    # run b asks for the same name before run a has written anything there
    second = claim_path(tmp_path, "proj-ep01-gs00007", "run-b", _is_ours("run-b"))
    assert second == tmp_path / "proj-ep01-gs00007-2"
    # a run's own claim (or checkpoint) is its own to replace
    assert claim_path(tmp_path, "proj-ep01-gs00007", "run-a", _is_ours("run-a")) == first


def _save_many(folder: str, run_id: str, barrier) -> None:
    """What a run does at each checkpoint: claim the name, write the folder atomically."""
    barrier.wait()
    for number in range(SAVES):
        path = claim_path(Path(folder), f"proj-{number:02d}", run_id, _is_ours(run_id))
        with atomic_folder(path, "checkpoint") as temp:
            (temp / "note.json").write_text(json.dumps({"run": run_id, "number": number}))


def test_two_runs_saving_at_the_same_moment_keep_every_checkpoint(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    runs = [
        context.Process(target=_save_many, args=(str(tmp_path), f"run-{k}", barrier))
        for k in range(2)
    ]
    for process in runs:
        process.start()
    for process in runs:
        process.join(timeout=120)
        assert process.exitcode == 0
    notes = [json.loads(p.read_text()) for p in tmp_path.glob("proj-*/note.json")]
    assert sorted((n["run"], n["number"]) for n in notes) == sorted(
        (f"run-{k}", number) for k in range(2) for number in range(SAVES)
    )
    assert not list(tmp_path.glob(f"proj-*/{CLAIM_FILE}"))  # every claim became a checkpoint
