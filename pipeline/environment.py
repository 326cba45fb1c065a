"""What, besides the code, the data and the seed, explains a difference between two runs.

A run on one machine repeats its figures exactly; on another CPU, thread count or package version
the figures move within their intervals (PyTorch's own reproducibility notes say the same). So
each training record carries the facts that tell two machines apart: the device, the CPU's model
and the instruction sets its kernels may use, the thread count and the package versions. Reading
them changes nothing: the library leaves process-wide settings to its entry points and users.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")
# the instruction sets whose presence changes which kernels NumPy, OpenCV, oneDNN and MKL run
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
                "amx_bf16")
PACKAGES = ("torch", "timm", "numpy", "opencv-python-headless", "onnxruntime")


def cpuinfo_field(key: str, cpuinfo: Path = CPUINFO) -> str:
    """A field of the first CPU in ``/proc/cpuinfo`` (empty when missing or unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def kernel_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """Which of :data:`KERNEL_FLAGS` the CPU has, in that order."""
    flags = set(cpuinfo_field("flags", cpuinfo).split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package (``absent`` when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the instruction set torch's kernels run at."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return device.type
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def run_environment(device: torch.device) -> dict[str, Any]:
    """The facts a training record keeps to explain a difference between machines."""
    return {
        "device": device_description(device),
        "cpu_flags": kernel_flags(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
