"""The CPU-kernel pin: which variables it sets, when, and that it comes before the libraries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cpu_kernels import (
    MARKER,
    NUMPY_ABOVE_AVX2_BEFORE_2_4,
    OPT_OUT,
    cpu_flags,
    numpy_features,
    pin_cpu_kernels,
)

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OPENCV_IPP",
          "OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES", "OPENCV_CPU_DISABLE", MARKER)
XEON_AMX = ("fpu sse2 avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni "
            "avx512_bf16 amx_bf16 amx_tile")


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    return path


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")


def test_an_avx512_cpu_is_capped_at_avx2_everywhere(tmp_path, x86):
    environ: dict[str, str] = {}
    pinned = pin_cpu_kernels(environ, cpuinfo(tmp_path, XEON_AMX))
    assert environ == {**pinned, MARKER: ",".join(sorted(pinned))}
    assert environ["ATEN_CPU_CAPABILITY"] == "avx2" and environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    # MKL keeps its AVX2 branch on Intel only; COMPATIBLE is the one it keeps on every vendor
    assert environ["MKL_CBWR"] == "COMPATIBLE" and environ["OPENCV_IPP"] == "avx2"
    assert environ["OPENBLAS_CORETYPE"] == "Haswell"
    # only the OpenCV paths this CPU has (OpenCV warns about each one it lacks)
    assert environ["OPENCV_CPU_DISABLE"] == "AVX512-COMMON,AVX512-SKX,AVX512-CLX"
    assert environ["NPY_DISABLE_CPU_FEATURES"] == numpy_features()


def test_numpy_names_its_targets_by_version():
    assert numpy_features("2.4.6") == numpy_features("3.0") == "X86_V4 AVX512_ICL AVX512_SPR"
    assert numpy_features("2.3.5") == numpy_features("1.26.4") == NUMPY_ABOVE_AVX2_BEFORE_2_4


def test_what_the_user_set_is_kept_and_the_opt_out_pins_nothing(tmp_path, x86):
    info = cpuinfo(tmp_path, XEON_AMX)
    environ = {"ATEN_CPU_CAPABILITY": "default"}
    assert "ATEN_CPU_CAPABILITY" not in pin_cpu_kernels(environ, info)
    assert environ["ATEN_CPU_CAPABILITY"] == "default" and environ["MKL_CBWR"] == "COMPATIBLE"
    for value in ("1", "true", "YES"):
        environ = {OPT_OUT: value}
        assert pin_cpu_kernels(environ, info) == {} and environ == {OPT_OUT: value}


def test_a_child_of_a_capped_process_can_opt_out_and_keeps_its_own_settings(tmp_path, x86):
    info = cpuinfo(tmp_path, XEON_AMX)
    parent: dict[str, str] = {}
    pin_cpu_kernels(parent, info)
    child = {**parent, OPT_OUT: "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}  # the user's own
    assert pin_cpu_kernels(child, info) == {}
    assert child == {OPT_OUT: "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    child = {**parent, "ATEN_CPU_CAPABILITY": "default"}  # capped child, one setting its own
    pinned = pin_cpu_kernels(child, info)
    assert child["ATEN_CPU_CAPABILITY"] == "default" and "ATEN_CPU_CAPABILITY" not in pinned
    assert child["MKL_CBWR"] == "COMPATIBLE" and "ATEN_CPU_CAPABILITY" not in child[MARKER]


def test_no_pin_without_avx2_off_x86_or_without_cpuinfo(tmp_path, x86, monkeypatch):
    environ: dict[str, str] = {}
    assert pin_cpu_kernels(environ, cpuinfo(tmp_path, "fpu sse2 sse4_2 avx")) == {}
    assert pin_cpu_kernels(environ, tmp_path / "missing") == {} and environ == {}
    assert cpu_flags(tmp_path / "missing") == set()
    amd_avx2 = pin_cpu_kernels(environ, cpuinfo(tmp_path, "sse2 avx avx2 fma"))
    assert "OPENCV_CPU_DISABLE" not in amd_avx2 and amd_avx2["MKL_CBWR"] == "COMPATIBLE"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert pin_cpu_kernels({}, cpuinfo(tmp_path, XEON_AMX)) == {}


PROBE = f"""
import json, os, sys
import stages
loaded = sorted(m for m in ("numpy", "cv2", "torch", "pandas") if m in sys.modules)
import torch
from pipeline.device import mkl_branch
print(json.dumps({{"loaded_before": loaded, "env": {{k: os.environ.get(k) for k in {PINNED!r}}},
                  "aten": torch.backends.cpu.get_cpu_capability(), "mkl": mkl_branch()}}))
"""


def probe(**env: str) -> dict:
    """What a stage process sees: ``import stages`` first, as ``python -m stages.x`` does."""
    clean = {k: v for k, v in os.environ.items() if k not in PINNED and k != OPT_OUT}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="not an x86-64 CPU with AVX2")
def test_a_stage_process_pins_before_numpy_opencv_and_torch_load():
    seen = probe()
    assert seen["loaded_before"] == []  # the cap was set before any of them was imported
    assert seen["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and seen["aten"] == "AVX2"
    assert seen["mkl"] == "COMPATIBLE"  # the branch MKL runs, asked of MKL itself
    native = probe(**{OPT_OUT: "1"})
    assert all(value is None for value in native["env"].values()) and native["mkl"] == "off"
    # a user's own setting wins: ATen's generic kernels, asked for by name
    assert probe(ATEN_CPU_CAPABILITY="default")["aten"] == "DEFAULT"
