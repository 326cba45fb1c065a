"""Where the work runs: device choice and bf16 autocast, shared by training and inference."""

from __future__ import annotations

import ctypes
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

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


# MKL's conditional-numerical-reproducibility branches (mkl_cbwr.h), as mkl_serv_cbwr_get reports
_MKL_BRANCHES = {0: "off", 1: "off", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
                 7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}


def mkl_branch() -> str:
    """The branch MKL really runs: ``MKL_CBWR`` asks for one, and MKL may run another (AUTO for
    an AVX2 request on an AMD CPU); ``unknown`` where torch's MKL cannot be asked."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        query = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    query.restype, query.argtypes = ctypes.c_int, [ctypes.c_int]
    code = query(1) & 0xFFFF  # MKL_CBWR_BRANCH, less the STRICT bit
    return _MKL_BRANCHES.get(code, str(code))


def kernels(device: torch.device) -> str:
    """What, besides the code, the package versions and the seed, decides a run's figures: the
    GPU, or the CPU kernels' instruction sets (capped by ``pipeline.cpu_kernels``) and threads."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return (f"cpu {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN {os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}, MKL {mkl_branch()}, "
            f"{threads} thread{'s' if threads != 1 else ''}")


def amp_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and CPUs with AVX-512 bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False
