"""Work is bounded: no endless walk, no read that blocks forever, no file read whole past a
limit, no worker process outliving its parent. Each case runs in a child process with a
timeout, so a regression fails the test instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_hostile import _alive, _children, class_tree

REPO = Path(__file__).resolve().parents[1]


def python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_folder_linking_to_itself_is_walked_once(tmp_path):
    root = class_tree(tmp_path / "data")
    for name in ("loop", "again"):
        (root / name).symlink_to(root, target_is_directory=True)
        (root / "monocyte" / name).symlink_to(root, target_is_directory=True)
    done = python("""
        import sys
        from pathlib import Path
        from pipeline.sources.ingest import ingest
        from pipeline.fingerprint import _file_hashes
        manifest = ingest(Path(sys.argv[1]), Path(sys.argv[2]), {}, workers=1)
        print(len(manifest), sorted(set(manifest["label"])))
        print(len(_file_hashes(Path(sys.argv[1]), Path(sys.argv[2]) / "cache.json")))
        """, str(root), str(tmp_path / "raw"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "8 ['eosinophil', 'lymphocyte', 'monocyte', 'neutrophil']", "8"]
    assert "a symbolic link to a folder (never followed)" in done.stderr


@pytest.mark.parametrize("stage", ["download", "source"])
def test_a_pipe_as_the_data_source_is_refused_not_waited_on(tmp_path, stage):
    os.mkfifo(tmp_path / "cells.zip")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": str(tmp_path / "cells.zip"), "cache_dir": str(tmp_path / "c")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: data.source '{tmp_path / 'cells.zip'}' is neither a folder nor an archive "
        "file (a pipe, socket or device)")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory there")
def test_a_huge_image_file_is_refused_unread(tmp_path):
    root = class_tree(tmp_path / "data")
    huge = root / "monocyte" / "huge.jpg"
    with open(huge, "wb") as handle:  # sparse: 1 GiB that takes no disk
        handle.truncate(1 << 30)
    done = python("""
        import sys
        from pathlib import Path
        import pandas as pd
        from pipeline.io import ImageDecodeError, decode_image
        from pipeline.sources.ingest import ingest
        ingest(Path(sys.argv[1]), Path(sys.argv[2]), {}, workers=2)
        print(pd.read_csv(Path(sys.argv[2]) / "rejected.csv").to_dict("records"))
        try:
            decode_image(Path(sys.argv[1]) / "monocyte" / "huge.jpg")
        except ImageDecodeError as error:
            print(error)
        status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
        print(int(status.split()[0]) < 512 * 1024)  # peak kB: far below the file's size
        """, str(root), str(tmp_path / "raw"))
    assert done.returncode == 0, done.stderr
    rejected, decoded, bounded = done.stdout.splitlines()
    assert rejected == ("[{'file': 'monocyte/huge.jpg', 'reason': 'file of 1073741824 bytes "
                        "exceeds the limit of 67108864 (data.max_file_bytes)'}]")
    assert decoded.endswith("huge.jpg: file of 1073741824 bytes exceeds the limit of 67108864 "
                            "(data.max_file_bytes)")
    assert bounded == "True"


def test_the_file_size_limit_is_a_param(tmp_path):
    from pipeline.sources.ingest import DataConfig, build_raw_dataset

    root = class_tree(tmp_path / "data")
    data = DataConfig(source=str(root), max_file_bytes=100)
    with pytest.raises(Exception, match="none of the 8 files"):
        build_raw_dataset(data, tmp_path / "raw", tmp_path / "cache")
    assert DataConfig().image_limits.max_bytes == 64 << 20


KILLED_PARENT = """
import sys, time
from pathlib import Path
from pipeline.errors import process_pool
from pipeline.{module} import {function}

def slow(job):
    time.sleep(0.5)
    return job

import pipeline.{module} as module
setattr(module, "{worker}", slow)
{call}
"""

POOLS = {
    "ingest": ("sources.ingest", "ingest", "_ingest_one",
               "ingest(Path(sys.argv[1]), Path(sys.argv[2]), {}, workers=2)"),
    "prepare": ("data", "prepare_all", "prepare_or_reason",
                "from pipeline.data import Preprocess\n"
                "prepare_all(sorted(Path(sys.argv[1]).rglob('*.png')) * 20,"
                " Preprocess(32, (0.5,) * 3, (0.2,) * 3), workers=2)"),
    "phash": ("split", "perceptual_hashes", "_phash",
              "perceptual_hashes(sorted(Path(sys.argv[1]).rglob('*.png')) * 50, workers=2)"),
}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list processes")
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_workers_die_when_their_parent_is_killed(tmp_path, pool):
    module, function, worker, call = POOLS[pool]
    root = class_tree(tmp_path / "data", per_class=20)
    script = tmp_path / "run.py"
    script.write_text(KILLED_PARENT.format(module=module, function=function, worker=worker,
                                           call=call))
    process = subprocess.Popen([sys.executable, str(script), str(root), str(tmp_path / "out")],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(workers := _children(process.pid)) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "no workers started"
        time.sleep(0.1)
    time.sleep(1.0)  # the workers are busy
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive := [pid for pid in workers if _alive(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:  # (tidy up before failing)
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {alive} outlived their killed parent")
        time.sleep(0.2)


def test_every_pool_of_the_pipeline_is_made_by_process_pool():
    users = sorted(path.relative_to(REPO).as_posix()
                   for path in (REPO / "pipeline").rglob("*.py")
                   if "ProcessPoolExecutor(" in path.read_text())
    assert users == ["pipeline/errors.py"]
