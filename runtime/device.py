"""Choosing the compute device and what goes with it (mixed precision, channels-last)."""

from __future__ import annotations

import contextlib
import logging

import torch

from runtime.errors import UserError

log = logging.getLogger(__name__)


class DeviceError(UserError, RuntimeError):
    """The asked-for device is not available here."""


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The dtype of mixed precision on ``device``, None for full precision: on CUDA bfloat16 where supported, else
    float16; on a CPU that multiplies bfloat16 natively (:func:`native_bfloat16`) bfloat16; none elsewhere, where
    it would be emulated and slower."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and native_bfloat16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` with :func:`amp_dtype`; full precision where that is None."""
    dtype = amp_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, so they cost about half of float32's: a CPU with
    AVX512-BF16 or AMX (oneDNN's kernels), a CUDA device with bfloat16 tensor cores."""
    if device.type == "cpu":  # torch's own CPU-feature probes (private: a release without them means "no")
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how results, logs and cache metadata name a precision."""
    return str(dtype).removeprefix("torch.")


def uses_channels_last(device: torch.device) -> bool:
    """Whether images go through convolutions channels-last on ``device``: on CUDA and on CPUs, where it was
    faster for every convolutional backbone measured and no slower for the others; not on MPS (unmeasured)."""
    return device.type in ("cuda", "cpu")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
