"""Build .dvc/plots/offline.html: DVC's plots page with Vega, Vega-Lite and vega-embed inlined.

`dvc plots show` writes a page whose charts load their scripts from a CDN, so offline every
chart is blank. This page (set as `plots.html_template` in .dvc/config) carries the scripts
itself: it has no `{scripts}` placeholder, so DVC's CDN tags are never written into it.

Run `python tools/build_plots_template.py` (needs npm and the npm registry) after changing a
pinned version below; it installs the packages into a temporary folder and writes the page with
each package's license and those of the packages it depends on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

# The majors DVC's own page loads (vega 5, vega-lite 5, vega-embed 6), at their latest releases.
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
SCRIPTS = {
    "vega": "build/vega.min.js",
    "vega-lite": "build/vega-lite.min.js",
    "vega-embed": "build/vega-embed.min.js",
}
OUTPUT = Path(__file__).resolve().parent.parent / ".dvc" / "plots" / "offline.html"
LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "license", "LICENCE")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Built by tools/build_plots_template.py: {versions}, inlined so that the charts draw
         with no network. Licenses: see the comment at the top of each script. -->
{scripts}
    <style>
        body {{ font-family: sans-serif; display: flex; flex-wrap: wrap; gap: 24px; }}
        body > div {{ max-width: 100%; overflow-x: auto; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def install(folder: Path) -> Path:
    """npm-install the pinned packages (no install scripts run) into ``folder``."""
    specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
    command = ["npm", "install", "--no-save", "--ignore-scripts", "--no-audit", "--no-fund",
               "--prefix", str(folder), *specs]
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"npm install {' '.join(specs)} failed: {error}") from None
    return folder / "node_modules"


def resolve(name: str, requirer: Path, modules: Path) -> Path:
    """The folder Node loads package ``name`` from when ``requirer`` requires it."""
    for folder in (requirer, *requirer.parents):
        candidate = folder / "node_modules" / name
        if candidate.is_dir():
            return candidate
        if folder == modules.parent:
            break
    raise SystemExit(f"{requirer.name} requires {name}, which npm did not install")


def runtime_packages(modules: Path) -> list[Path]:
    """The pinned packages and everything their ``dependencies`` pull in, transitively (not the
    optional, platform-specific ones), so that the notices are the same on every machine."""
    found: set[Path] = set()
    pending = [modules / name for name in PACKAGES]
    while pending:
        package = pending.pop()
        if package in found:
            continue
        found.add(package)
        meta = json.loads((package / "package.json").read_text(encoding="utf8"))
        pending.extend(resolve(name, package, modules) for name in meta.get("dependencies", {}))
    return sorted(found)


def package_notice(package: Path) -> str:
    """``name version (license)`` and the package's license text, when it ships one."""
    meta = json.loads((package / "package.json").read_text(encoding="utf8"))
    heading = f"{meta['name']} {meta['version']} ({meta.get('license', 'license not stated')})"
    texts = [(package / name).read_text(encoding="utf8")
             for name in LICENSE_NAMES if (package / name).is_file()]
    return "\n".join([heading, *texts[:1]])


def license_comment(notices: list[str]) -> str:
    """The notices as a /*! */ comment, which minifiers and readers keep."""
    body = "\n\n".join(notices).replace("*/", "* /")
    return f"/*!\n{body}\n*/"


def script_tag(modules: Path, name: str, notices: list[str]) -> str:
    """An inline <script> with the package's minified build after its license comment."""
    code = (modules / name / SCRIPTS[name]).read_text(encoding="utf8")
    if "</script" in code.lower():
        raise SystemExit(f"{name}'s build contains '</script' and cannot be inlined")
    return f"<script>\n{license_comment(notices)}\n{code}\n</script>"


def build(modules: Path) -> str:
    """The page, from an installed ``node_modules`` folder."""
    for name, version in PACKAGES.items():
        installed = json.loads((modules / name / "package.json").read_text(encoding="utf8"))
        if installed["version"] != version:
            raise SystemExit(f"{name} {installed['version']} installed, {version} pinned")
    # The builds bundle some of their dependencies (d3 in vega, for one) without their license
    # banners: vega's comment lists every package the three depend on.
    own = {name: package_notice(modules / name) for name in PACKAGES}
    others = [package_notice(folder) for folder in runtime_packages(modules)
              if folder.parent != modules or folder.name not in PACKAGES]
    scripts = "\n".join(
        script_tag(modules, name, [own[name], *(others if name == "vega" else [])])
        for name in PACKAGES)
    versions = ", ".join(f"{name} {version}" for name, version in PACKAGES.items())
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):
        if placeholder in scripts:
            raise SystemExit(f"a script contains DVC's placeholder {placeholder}")
    return PAGE.format(versions=versions, scripts=scripts)


def write_page(page: str, out: Path) -> None:
    """Write ``page`` to ``out`` whole or not at all (a partial file, then a rename)."""
    partial = out.with_name(out.name + ".partial")
    try:
        partial.write_text(page, encoding="utf8")
        partial.replace(out)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"cannot write {out}: {error.strerror}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        page = build(install(Path(folder)))
    write_page(page, args.out)
    print(f"wrote {args.out} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
