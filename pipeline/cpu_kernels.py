"""The same CPU kernels on every x86-64 Linux machine, so that results do not depend on the CPU.

PyTorch (ATen), oneDNN, MKL, OpenCV (its own code and Intel IPP), NumPy and its OpenBLAS each
pick, at run time, the widest vector instructions the CPU offers (AVX2, AVX-512, AMX), and each
width rounds and adds in its own order (BENCHMARKS.md, "Numeric mode"). This module caps them at
AVX2, which every x86-64 server CPU of the last decade has. MKL is the exception: it honours an
AVX2 branch (``MKL_CBWR``) only on Intel CPUs and runs its own choice on AMD ones, so it gets
its ``COMPATIBLE`` branch, the one it keeps on every vendor (about 10% slower training, measured).
The thread count still matters (parallel sums split by thread), so it is recorded beside the
figures (``pipeline.device.kernels``).

This module imports only the standard library: ``pipeline/__init__`` calls
:func:`pin_cpu_kernels` before NumPy and OpenCV are imported (they read their variables at
import; torch's libraries and IPP at their first use), and ``stages/__init__`` imports
``pipeline`` first. A variable the user set is left as it is; ``WBC_NATIVE_CPU_KERNELS=1`` turns
the cap off, also in a child of a capped process (``WBC_PINNED_CPU_KERNELS`` lists what the cap
set): the CPU's widest kernels, faster on AVX-512 and AMX, with that machine's own figures.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

OPT_OUT = "WBC_NATIVE_CPU_KERNELS"
MARKER = "WBC_PINNED_CPU_KERNELS"  # the variables the cap set, so a child can tell them apart
CPUINFO = Path("/proc/cpuinfo")
FIXED_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "MKL_CBWR": "COMPATIBLE", "OPENCV_IPP": "avx2", "OPENBLAS_CORETYPE": "Haswell"}
_SKX = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_CNL = _SKX | {"avx512ifma", "avx512vbmi"}
# OpenCV's dispatched code paths above AVX2, with the /proc/cpuinfo flags each needs (OpenCV
# prints a warning for every feature it is asked to disable that the CPU lacks)
OPENCV_FEATURES = {
    "AVX_VNNI": {"avx_vnni"},
    "AVX512-COMMON": {"avx512f", "avx512cd"},
    "AVX512-SKX": _SKX,
    "AVX512-CLX": _SKX | {"avx512_vnni"},
    "AVX512-CNL": _CNL,
    "AVX512-ICL": _CNL | {"avx512_vnni", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq"},
}
# NumPy's dispatch targets above AVX2 (named by CPU generation before NumPy 2.4)
NUMPY_ABOVE_AVX2 = "X86_V4 AVX512_ICL AVX512_SPR"
NUMPY_ABOVE_AVX2_BEFORE_2_4 = ("AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX "
                               "AVX512_CNL AVX512_ICL AVX512_SPR")


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


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The instruction-set flags of the first CPU listed in ``cpuinfo``."""
    return set(cpuinfo_field("flags", cpuinfo).split())


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name, recorded with a run's resources."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def numpy_features(version: str | None = None) -> str:
    """NumPy's names for its targets above AVX2, for ``version`` (default: the installed one)."""
    from importlib import metadata  # 40-60 ms to import: only on CPUs that have such targets

    try:
        version = version or metadata.version("numpy")
        major, minor = (int(part) for part in version.split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return NUMPY_ABOVE_AVX2
    return NUMPY_ABOVE_AVX2 if (major, minor) >= (2, 4) else NUMPY_ABOVE_AVX2_BEFORE_2_4


def cpu_kernel_pins(flags: set[str]) -> dict[str, str]:
    """The environment that caps every library at AVX2 on a CPU with these flags (NumPy's and
    OpenCV's paths above AVX2 are turned off only where the CPU has them)."""
    opencv = [name for name, needs in OPENCV_FEATURES.items() if needs <= flags]
    return {**FIXED_PINS,
            **({"NPY_DISABLE_CPU_FEATURES": numpy_features()} if "avx512f" in flags else {}),
            **({"OPENCV_CPU_DISABLE": ",".join(opencv)} if opencv else {})}


def _ours(environ: MutableMapping[str, str], pins: dict[str, str]) -> set[str]:
    """Variables a capped parent set (listed in the marker, still at the cap's value)."""
    listed = set(environ.get(MARKER, "").split(","))
    return {name for name, value in pins.items() if name in listed and environ.get(name) == value}


def pin_cpu_kernels(environ: MutableMapping[str, str] = os.environ,
                    cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """Cap the libraries at AVX2 on an x86-64 Linux CPU that has it and FMA, unless the user
    opted out; returns the variables set. One the user set is never changed."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    flags = cpu_flags(cpuinfo)
    if not {"avx2", "fma"} <= flags:
        return {}
    pins = cpu_kernel_pins(flags)
    inherited = _ours(environ, pins)
    if environ.get(OPT_OUT, "").strip().lower() in ("1", "true", "yes"):
        for name in (*inherited, MARKER):
            environ.pop(name, None)
        return {}
    pinned = {name: value for name, value in pins.items()
              if name not in environ or name in inherited}
    environ.update(pinned)
    environ[MARKER] = ",".join(sorted(pinned))
    return pinned
