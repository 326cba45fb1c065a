"""Where the work runs: device choice and bf16 autocast, shared by training and inference."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from pipeline.errors import InputError


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, else Apple MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA and CPU when enabled; a no-op elsewhere."""
    if not enabled or device.type == "mps":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def use_bf16(device: torch.device, setting: bool | str = "auto") -> bool:
    """Whether to run in bf16 autocast: ``auto`` on CUDA only, so that CPU numbers are the same
    on every CPU (fp32); ``true`` also on CPUs with AVX-512 bf16 or AMX (an opt-in: faster
    inference there, slower training, different numbers); ``false`` never."""
    if setting not in ("auto", True, False):
        raise InputError(f"train.amp must be auto, true or false, not {setting!r}")
    if setting == "auto":
        return device.type == "cuda" and amp_supported(device)
    return bool(setting) and amp_supported(device)


def numeric_mode(bf16: bool) -> str:
    """The arithmetic a run used, as recorded beside its metrics."""
    return "bf16-autocast" if bf16 else "fp32"


def amp_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and CPUs with AVX-512 bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False
