"""A git copy of this checkout (code, params, dvc.yaml; no data or results), as a fresh clone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("data/", "metrics/", "dvclive/", "reports/", "dvc.lock", ".dvc/cache", ".dvc/tmp")
GIT = ["git", "-c", "user.name=tests", "-c", "user.email=tests@wbc.local"]


def fresh_clone(dest: Path) -> Path:
    """``dest`` holding this checkout's tracked and untracked-unignored files, committed."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith(SKIP):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for step in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run([*GIT, *step], cwd=dest, check=True, capture_output=True)
    return dest
