"""Several processes (gloo on the CPU): same training, same resume. Each test forks its group
from `tests.group`, with the variables `accelerate launch` gives it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config.errors import UserError
from models import load_models
from models.text_keys import standard_text_encoder_state_dict
from tests.e2e import (
    ADAMW,
    REPO,
    checkpoints,
    free_port,
    manual_validation,
    own,
    run,
    run_folders,
    scalars,
    trained_weights,
    training_state,
    write_config,
)
from tests.group import FSDP, Outcome, launch_alone, launch_group
from training.distributed import check_process_group

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def launch(config: Path, processes: int) -> Outcome:
    return launch_group(REPO / "train.py", processes, "--config", str(config))


def relative_difference(a: dict, b: dict) -> float:
    """|a - b| over |a - initial weights|: how far apart two runs are, next to how far they went."""
    start = load_models("tiny-sd15")
    w0 = {f"unet.{k}": v for k, v in start.unet.state_dict().items()}
    text = standard_text_encoder_state_dict(start.text_encoder)
    w0 |= {f"text_encoder.{k}": v for k, v in text.items()}
    difference = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    change = sum((a[k] - w0[k]).norm() ** 2 for k in a) ** 0.5
    return float(difference / change)


def ema_of(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}_ema")


def test_two_processes_of_batch_b_train_like_one_of_batch_2b(tmp_path):
    """Training, resume and validation: 2 processes of batch B are 1 process of batch 2B, and
    a checkpoint of either resumes on the other (the same global batch)."""
    keys = {
        "max_epochs": 2,
        "save_full_precision": True,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "grad_accum": 2,
        "embedding_perturbation": 0.1,
        "validation_config": manual_validation(tmp_path),
        "ema_decay_rate": 0.9,
        "ema_update_interval": 1,
    }
    two = write_config(tmp_path / "two", ADAMW, batch_size=2, **keys)
    one = write_config(tmp_path / "one", ADAMW, batch_size=4, **keys)
    result = launch(two, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 per process x 2 process(es) x 2 accumulation = 8 images" in result.stderr
    assert len(list((tmp_path / "two" / "logs").iterdir())) == 1  # the main process writes
    assert run(one) == 0

    # Validation: the processes share the passes; the values are the one-process ones.
    (two_folder,) = run_folders(tmp_path / "two")
    (one_folder,) = run_folders(tmp_path / "one")
    two_values, one_values = scalars(two_folder, "loss/val"), scalars(one_folder, "loss/val")
    assert len(two_values) == len(one_values) == 3  # before training and after each epoch
    # before training the weights are the same: only the summation order differs
    assert two_values[0] == pytest.approx(one_values[0], rel=1e-6)
    # later the weights differ by the all-reduce's float rounding
    assert two_values[1:] == pytest.approx(one_values[1:], rel=1e-3)
    a, b = own(tmp_path / "two", "last-"), own(tmp_path / "one", "last-")
    assert a.name == b.name  # same number of optimizer steps
    # Float rounding only: gradient all-reduce and batch-size-dependent kernels (measured 0.4%).
    assert relative_difference(trained_weights(a), trained_weights(b)) < 0.02

    # A two-process run resumed from its epoch-1 checkpoint ends where the straight one did.
    middle = own(tmp_path / "two", "myproj-ep01")
    resumed = write_config(
        tmp_path / "resumed", ADAMW, batch_size=2, **keys, resume_ckpt=str(middle)
    )
    result = launch(resumed, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    c = own(tmp_path / "resumed", "last-")
    for ema in (False, True):
        wa = trained_weights(ema_of(a) if ema else a)
        wc = trained_weights(ema_of(c) if ema else c)
        assert all(torch.equal(wa[k], wc[k]) for k in wa)
    check_elastic_resume(tmp_path, keys, {2: a, 1: b})


def check_elastic_resume(tmp_path: Path, keys: dict, straight: dict[int, Path]) -> None:
    """Elastic resume: each straight run's epoch-1 checkpoint, resumed on the other process
    count (2 x 2 <-> 1 x 4, global batch 4), ends where that straight run ended, to float
    rounding (weights and EMA)."""
    for first, then in ((2, 1), (1, 2)):
        source = tmp_path / ("two" if first == 2 else "one")
        folder = tmp_path / f"{first}to{then}"
        config = write_config(
            folder,
            ADAMW,
            batch_size=4 // then,
            **keys,
            resume_ckpt=str(own(source, "myproj-ep01")),
        )
        if then == 2:
            result = launch(config, 2)
            assert result.returncode == 0, result.stderr[-4000:]
            log = result.stderr
        else:
            assert run(config) == 0
            log = (run_folders(folder)[0] / "train.log").read_text()
        assert "the same global batch of 4" in log
        end = own(folder, "last-")
        for ema in (False, True):
            mine = trained_weights(ema_of(end) if ema else end)
            theirs = trained_weights(ema_of(straight[first]) if ema else straight[first])
            difference = relative_difference(mine, theirs)
            assert difference < 0.02, f"{first} -> {then} processes (EMA {ema}): {difference}"


PATCHED_TRAIN = """
import hashlib, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
import training.loop as loop

real_loss, calls = loop.batch_loss, {{"n": 0}}


def batch_loss(*args, **kwargs):
    calls["n"] += 1
    loss = real_loss(*args, **kwargs)
    # rank 1 only: a non-finite loss on the last batch of the second accumulation window
    return loss * float("nan") if dist.get_rank() == 1 and calls["n"] == 4 else loss


real_train = loop.Trainer.train


def train(self, stop):
    outcome = real_train(self, stop)
    digest = hashlib.sha256()
    for name, tensor in sorted(self.models.bundle.unet.state_dict().items()):
        digest.update(tensor.numpy().tobytes())
    print(f"RANK {{dist.get_rank()}} UNET {{digest.hexdigest()}}", file=sys.stderr)
    return outcome


loop.batch_loss, loop.Trainer.train = batch_loss, train
import train as entry
sys.exit(entry.main())
"""


def test_a_nonfinite_loss_in_one_process_skips_the_window_in_every_process(tmp_path):
    """The last batch of a window is the only one that all-reduces gradients: when it is skipped
    in one process, every process must skip the optimizer step, or their weights drift apart."""
    script = tmp_path / "patched_train.py"
    script.write_text(PATCHED_TRAIN.format(repo=str(REPO)))
    config = write_config(tmp_path, ADAMW, max_epochs=1, grad_accum=2)
    result = launch_group(script, 2, "--config", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "non-finite loss at epoch 1 batch 3" in result.stderr
    digests = dict(re.findall(r"RANK (\d) UNET ([0-9a-f]{64})", result.stderr))
    assert set(digests) == {"0", "1"}
    assert digests["0"] == digests["1"], "the processes' weights drifted apart"


def test_two_machines_train_a_lora_as_one_group_of_the_whole_batch(tmp_path):
    """Two machines' launches on localhost (machine ranks 0 and 1) form one group of 2 processes,
    whose LoRA adapters are one process's with twice the batch, to float rounding (the
    adapters' gradients are all-reduced as weights' are). Both runs share a latent cache on
    disk: the two processes encode it together, the lone one finds every entry."""
    keys = {"max_epochs": 1, "lora_rank": 4, "lora_alpha": 4.0, "cache_latents": True}
    keys["latent_cache_dir"] = str(tmp_path / "cache")
    two = write_config(tmp_path / "two", ADAMW, batch_size=1, **keys)
    one = write_config(tmp_path / "one", ADAMW, batch_size=2, **keys)
    result = launch_group(REPO / "train.py", 2, "--config", str(two), machines=2)
    outputs = result.stderrs
    assert result.returncode == 0, outputs[0][-3000:] + outputs[1][-3000:]
    assert "1 per process x 2 process(es)" in outputs[0]
    assert len(run_folders(tmp_path / "two")) == 1  # one group, one run folder
    pattern = r"(\d+) entries, 0 found, \1 encoded \((\d+) here"
    encoded = [re.search(pattern, output) for output in outputs]  # each process's report
    assert all(encoded), outputs[0][-3000:] + outputs[1][-3000:]
    here = sum(int(match.group(2)) for match in encoded if match)
    assert here == int(encoded[0].group(1))  # shared, not repeated
    assert run(one) == 0
    log = (run_folders(tmp_path / "one")[0] / "train.log").read_text()
    assert re.search(r"(\d+) entries, \1 found, 0 encoded", log)
    a, b = (lora_state(tmp_path / name) for name in ("two", "one"))
    assert a.keys() == b.keys()
    ups = [k for k in a if ".lora_B." in k]  # zero at the start: all they hold is training
    difference = sum((a[k] - b[k]).norm() ** 2 for k in ups) ** 0.5
    size = sum(b[k].norm() ** 2 for k in ups) ** 0.5
    assert size > 0
    assert difference < 0.01 * size, float(difference / size)  # the all-reduce's rounding


def lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 adapters of the run's last checkpoint, both models."""
    (last,) = checkpoints(folder, "last-")
    state = last / "training_state"
    return {
        f"{name}.{k}": v
        for name in ("unet", "text_encoder")
        for k, v in load_file(state / f"{name}_lora.safetensors").items()
    }


def test_machines_launched_without_multi_gpu_are_refused(tmp_path):
    """Without --multi_gpu each machine's command would start a lone run over the whole
    dataset: machine 0 of two, as accelerate's simple launcher runs it, is refused."""
    config = write_config(tmp_path, ADAMW, max_epochs=1)
    flags = (
        *("--num_machines", "2", "--num_processes", "2", "--machine_rank", "0"),
        *("--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
    )
    result = launch_alone(REPO / "train.py", "--config", str(config), flags=flags)
    assert result.returncode != 0
    assert "did not form a process group" in result.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


@pytest.mark.parametrize(
    ("processes", "env", "refused"),
    [
        (1, {}, False),  # python train.py
        (1, {"ACCELERATE_USE_CPU": "False"}, False),  # accelerate launch, one process
        (1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1"}, True),  # a lone "group"
        (2, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1"}, False),
        # torchrun's one process (accelerate launch --use_fsdp --num_processes 1)
        (1, {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "1"}, False),
    ],
)
def test_a_launch_that_formed_no_group_is_refused(processes, env, refused):
    if refused:
        with pytest.raises(UserError, match="did not form a process group"):
            check_process_group(processes, env)
    else:
        check_process_group(processes, env)


SDXL_KEYS = {"resume_ckpt": "tiny-sdxl", "max_epochs": 1}


@pytest.fixture(scope="module")
def sdxl_one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    """SDXL trained by one process of batch 2: what 2 processes of batch 1 must match."""
    folder = tmp_path_factory.mktemp("sdxl_one")
    assert run(write_config(folder, ADAMW, batch_size=4, **SDXL_KEYS)) == 0
    return training_state(own(folder, "last-"))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_sdxl_like_one_with_the_whole_batch(tmp_path, engine, sdxl_one_process):
    """SDXL with both text encoders training under DDP (every trained parameter gets a
    gradient in every step: the first encoder's unused final layer and norm are frozen) or
    sharded by FSDP2: 2 processes of batch 1 train as one process of batch 2, to float
    rounding, and save both encoders whole."""
    two = write_config(tmp_path / "two", ADAMW, batch_size=2, **SDXL_KEYS)
    if engine == "ddp":
        result = launch(two, 2)
    else:
        result = launch_group(REPO / "train.py", 2, "--config", str(two), flags=FSDP)
        assert "FSDP: text_encoder_2 sharded" in result.stderr
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = training_state(own(tmp_path / "two", "last-")), sdxl_one_process
    start = load_models("tiny-sdxl")
    w0 = {
        f"{name}.{key}": value
        for name in ("unet", "text_encoder")
        for key, value in start.component(name).state_dict().items()
    }
    assert a.keys() == b.keys() and set(a) <= set(w0)
    assert any(".text_encoder_2." in key for key in a)
    difference = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    change = sum((a[k] - w0[k]).norm() ** 2 for k in a) ** 0.5
    assert change > 0
    assert difference < 0.02 * change, float(difference / change)


def test_an_fsdp1_launch_is_refused_before_anything_is_written(tmp_path):
    config = write_config(tmp_path, ADAMW, max_epochs=1)
    flags = ("--use_fsdp", "--num_machines", "1", "--mixed_precision", "no")
    result = launch_group(REPO / "train.py", 2, "--config", str(config), flags=flags)
    assert result.returncode != 0
    assert "fsdp_version 1: the trainer runs FSDP2 only" in result.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
