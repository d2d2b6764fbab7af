"""Single-file checkpoints (``.safetensors``, ``.ckpt``) in the original Stable Diffusion layout.

Writing: `write_single_file` puts every weight of a `ModelBundle` into one ``.safetensors`` in
the LDM key layout (`models.ldm_layout`), fp16 unless full precision, plus for SD1.x/2.x
v-prediction models a ``.yaml`` of the same name (`models.ldm_config`) so that UIs use
v-parameterization. SDXL files carry that in the file instead, as ComfyUI and the SDXL v-prediction
fine-tunes do: an empty ``v_pred`` tensor, and ``ztsnr`` for a zero-terminal-SNR schedule.
Both are written atomically: into hidden temporary files in the same folder, flushed to disk,
then renamed over the targets, so a crash never leaves a file that looks whole, and an older file
of the same name stays until the new one is complete.

Reading: `read_single_file` gives the tensors of a file. ``.ckpt`` files are read with
``torch.load(weights_only=True)``: tensors and plain containers only; a file that needs code to
unpickle is refused (no code from a checkpoint ever runs).
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from config.errors import UserError
from models.bundle import SDXL, ModelBundle
from models.ldm_config import V_PREDICTION, original_config_yaml
from models.ldm_layout import ldm_state_dict
from storage.atomic import atomic_file, write_error

logger = logging.getLogger(__name__)

SAFETENSORS = ".safetensors"
CKPT = ".ckpt"
SINGLE_FILE_SUFFIXES = (SAFETENSORS, CKPT)
YAML = ".yaml"
WHAT = "single file"
# Keys of an SDXL single file (empty tensors) that say how it was trained.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
# Where torch.load(weights_only=True) puts the reason in its long message.
_UNPICKLER_REASON = "WeightsUnpickler error:"


def yaml_beside(path: Path) -> Path:
    """The ``.yaml`` that UIs read beside a single file: same name, ``.yaml`` suffix."""
    return Path(path).with_suffix(YAML)


# --- writing ---------------------------------------------------------------------------------


def write_single_file(path: Path, bundle: ModelBundle, full_precision: bool) -> Path:
    """Write the bundle's UNet, VAE and text encoder to ``path`` as one LDM-layout safetensors.

    fp16 unless ``full_precision``. For an SD1.x/2.x v-prediction model ``<path stem>.yaml`` is
    written first (a stale one of another model is removed after the model file); an SDXL file
    holds `sdxl_markers` instead. The models are left
    as they are. At most one converted copy of the weights is held at a time (none for fp32
    models on the CPU written in fp32). An OS error (unwritable folder, full disk) is a
    `UserError` naming the file; an older file at ``path`` stays intact.
    """
    path = Path(path)
    assert path.suffix == SAFETENSORS, f"{path}: a single file must end in {SAFETENSORS}"
    started = time.monotonic()
    dtype = torch.float32 if full_precision else torch.float16
    yaml_file = yaml_beside(path)
    writes_yaml = bundle.prediction_type == V_PREDICTION and bundle.family != SDXL
    if writes_yaml:
        text = original_config_yaml(bundle)
        atomic_file(yaml_file, lambda temp: temp.write_text(text, encoding="utf-8"), WHAT)

    def write(temp: Path) -> None:
        tensors = ldm_state_dict(
            bundle.unet,
            bundle.vae,
            bundle.text_encoder,
            lambda t: _for_file(t, dtype),
            text_encoder_2=bundle.text_encoder_2,
        )
        tensors |= sdxl_markers(bundle)
        safetensors.torch.save_file(tensors, str(temp), metadata={"format": "pt"})

    try:
        atomic_file(path, write, WHAT)
    except SafetensorError as error:
        raise write_error(path, error, WHAT) from error
    if not writes_yaml and yaml_file.exists():
        logger.info("removing %s: it does not describe the model at %s", yaml_file, path)
        yaml_file.unlink()
    logger.info(
        "single file written to %s in %.1f s (%s)",
        path,
        time.monotonic() - started,
        "fp32" if full_precision else "fp16",
    )
    return path


def sdxl_markers(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The empty marker tensors of an SDXL file: ``v_pred`` for v-prediction, ``ztsnr`` for a
    zero-terminal-SNR schedule (as ComfyUI reads them); none for SD1.x/2.x or epsilon models."""
    if bundle.family != SDXL:
        return {}
    markers = {}
    if bundle.prediction_type == V_PREDICTION:
        markers[V_PRED_MARKER] = torch.zeros(0)
        if bundle.noise_scheduler.config.get("rescale_betas_zero_snr", False):
            markers[ZTSNR_MARKER] = torch.zeros(0)
    return markers


def _for_file(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in ``dtype`` (floating point only); the tensor itself when it already is."""
    target = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", target).contiguous()


# --- reading ---------------------------------------------------------------------------------


def is_single_file(path: Path) -> bool:
    """Whether ``path`` names a single-file checkpoint by its suffix (any case)."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def read_single_file(path: Path, weights: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` or ``.ckpt`` file, on the CPU; without ``weights``,
    on the meta device (shapes and dtypes: of a ``.safetensors`` file only the header is read).

    A ``.ckpt`` may wrap its weights in ``state_dict`` (Lightning checkpoints, several levels
    deep); other entries that are not tensors (epoch, global_step) are dropped.
    """
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS:
        try:
            if not weights:
                return _header_tensors(path)
            return safetensors.torch.load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as error:
            raise UserError(
                f"resume_ckpt: {path} cannot be read as safetensors: {error}"
            ) from error
    tensors = _read_ckpt(path)
    return tensors if weights else {k: v.to("meta") for k, v in tensors.items()}


# safetensors' dtype names (the header's "dtype") and torch's dtypes of the same name.
_DTYPES = {
    name: getattr(torch, dtype)
    for name, dtype in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }.items()
    if hasattr(torch, dtype)
}


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors, from its header (which safetensors checks against
    the file's size)."""
    out: dict[str, torch.Tensor] = {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        names = file.keys()  # a safe_open handle is not iterable
        for key in names:
            entry = file.get_slice(key)
            dtype = _DTYPES.get(entry.get_dtype())
            if dtype is None:
                raise UserError(
                    f"resume_ckpt: {path}: tensor {key} is of dtype {entry.get_dtype()}, which "
                    f"torch {torch.__version__} does not have"
                )
            out[key] = torch.empty(entry.get_shape(), dtype=dtype, device="meta")
    return out


def _read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needed = _globals_needed(path)
        if needed:
            raise _needs_code(path, needed) from error
        raise UserError(
            f"resume_ckpt: {path} cannot be read as a .ckpt: {_reason(error)}"
        ) from error
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise UserError(f"resume_ckpt: {path} cannot be read as a .ckpt: {error}") from error
    while isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        raise UserError(
            f"resume_ckpt: {path} holds a {type(content).__name__}, not a dictionary of weights"
        )
    return {k: v for k, v in content.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _globals_needed(path: Path) -> list[str]:
    """The Python objects (module.name) a .ckpt's pickle names beyond what is safe to load."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return []


def _reason(error: BaseException) -> str:
    """The reason of a weights-only unpickling error, without torch's advice to unpickle code."""
    text = str(error)
    if _UNPICKLER_REASON in text:
        text = text.split(_UNPICKLER_REASON, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _needs_code(path: Path, needed: list[str]) -> UserError:
    return UserError(
        f"resume_ckpt: {path} holds pickled Python objects ({', '.join(needed)}) that need code "
        f"to load; this trainer never runs code from a checkpoint. Convert it to .safetensors "
        f"(only if you trust where it came from) and set resume_ckpt to the .safetensors file"
    )
