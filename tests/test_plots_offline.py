"""`dvc plots show` draws its charts with no network, in a real headless browser.

The page template (.dvc/plots/offline.html, set as `plots.html_template` in .dvc/config) inlines
Vega, Vega-Lite and vega-embed: DVC's own page loads them from a CDN, so offline its charts are
blank. The browser tests need Debian's `chromium`: without it they skip, or fail where
WBC_REQUIRE_BROWSER=1 (CI, so that they cannot pass there by skipping).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_render import VegaRenderer, render_html
from dvc_render.html import PAGE_HTML
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DVC_DIR = ROOT / ".dvc"
TEMPLATE = DVC_DIR / "plots" / "offline.html"
# Every host name fails to resolve and every request goes to a closed proxy: no network at all.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A confusion matrix's classes: "ig" is never predicted, "platelet" is predicted, never a label.
PREDICTIONS = [("basophil", "basophil"), ("basophil", "eosinophil"), ("eosinophil", "eosinophil"),
               ("ig", "eosinophil"), ("ig", "platelet"), ("eosinophil", "basophil")]


def _builder():
    """tools/build_plots_template.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_plots_template",
                                                  ROOT / "tools" / "build_plots_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's command; a skip without it, or a failure where WBC_REQUIRE_BROWSER=1."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "needs Debian's chromium (apt-get install chromium)"
        if os.environ.get("WBC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WBC_REQUIRE_BROWSER=1: {reason}")
        pytest.skip(reason)
    return found


def _dump_dom(chromium: str, page: Path, profile: Path) -> str:
    """The page's DOM after headless Chromium ran its scripts with the network cut off."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={profile}", *OFFLINE, "--virtual-time-budget=10000",
               "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _charts(page: Path, dom: str) -> dict[str, str]:
    """Each chart div of the page that DVC wrote (id -> its HTML in ``dom``, as drawn)."""
    ids = re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec',
                     page.read_text(encoding="utf8"))
    starts = sorted((match.start(), match.group(1))
                    for match in re.finditer(r'<div id="([^"]+)"', dom))
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    return {name: dom[start:end]
            for (start, name), end in zip(starts, ends, strict=True) if name in ids}


def _write_table(path: Path, header: list[str], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerows([header, *rows])


def _write_plot_data(repo: Path, definition: dict) -> None:
    """Small data for each file of one of dvc.yaml's top-level chart definitions."""
    x, template = definition["x"], definition["template"]
    for name, y in definition["y"].items():
        if "confusion" in template:
            _write_table(repo / name, [y, x], PREDICTIONS)
        elif "by_class" in template:
            rows = [(c, v, v * v) for c in ("basophil", "ig") for v in (0.0, 0.5, 1.0)]
            _write_table(repo / name, ["class", x, y], rows)
        else:
            _write_table(repo / name, [x, y], [(1, 0.9), (2, 0.6), (3, 0.5)])


@pytest.fixture(scope="module")
def project_plots_repo(tmp_path_factory) -> Path:
    """A repository with the project's top-level plots, DVC config and templates, and small data
    for every file those plots read."""
    repo = tmp_path_factory.mktemp("plots") / "repo"
    shutil.copytree(DVC_DIR / "plots", repo / ".dvc" / "plots")
    shutil.copy2(DVC_DIR / "config", repo / ".dvc" / "config")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    for entry in plots:
        if isinstance(entry, str):  # an image
            (repo / entry).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), "white").save(repo / entry)
        else:
            _write_plot_data(repo, next(iter(entry.values())))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def test_config_points_dvc_at_the_inlined_template():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        configured = Path(repo.dvc_dir, repo.config["plots"]["html_template"])
    assert configured.resolve() == TEMPLATE.resolve()


def test_template_inlines_the_pinned_scripts_with_their_licenses():
    page = TEMPLATE.read_text(encoding="utf8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags never go in
    assert not re.search(r"<script[^>]+src=", page) and "cdn.jsdelivr" not in page
    banners = re.findall(r"<script>\n/\*!\n(\S+) (\S+) \((\S+)\)\n", page)
    assert banners == [(name, version, "BSD-3-Clause")
                       for name, version in _builder().PACKAGES.items()]
    assert "Copyright" in page and "d3-array" in page  # bundled dependencies' notices too


def _fake_modules(root: Path, code: str = "window.x = 1;", vega: str = "5.33.1") -> Path:
    """A node_modules folder like npm's, with stand-in builds and one shared dependency."""
    modules = root / "node_modules"
    builder = _builder()
    for name, version in builder.PACKAGES.items():
        folder = modules / name
        (folder / "build").mkdir(parents=True)
        meta = {"name": name, "version": vega if name == "vega" else version,
                "license": "BSD-3-Clause", "dependencies": {"d3-array": "3"},
                "optionalDependencies": {"@rollup/rollup-linux-x64-gnu": "4"}}
        (folder / "package.json").write_text(json.dumps(meta))
        (folder / "LICENSE").write_text(f"Copyright (c) {name} authors */ end")
        (folder / builder.SCRIPTS[name]).write_text(code)
    for name in ("d3-array", "@rollup/rollup-linux-x64-gnu"):
        (modules / name).mkdir(parents=True)
        (modules / name / "package.json").write_text(
            json.dumps({"name": name, "version": "1.0.0", "license": "ISC"}))
    return modules


def test_builder_lists_runtime_dependencies_and_escapes_comment_ends(tmp_path):
    page = _builder().build(_fake_modules(tmp_path))
    notice = page[page.index("/*!"):page.index("*/", page.index("/*!"))]
    assert "d3-array 1.0.0 (ISC)" in notice  # a dependency vega bundles
    assert "rollup" not in page  # an optional, platform-specific package is not a dependency
    assert "vega authors * / end" in notice  # a "*/" in a license cannot end the comment early
    assert page.count("window.x = 1;") == 3


@pytest.mark.parametrize("modules, message", [
    (lambda root: _fake_modules(root, vega="5.0.0"), "vega 5.0.0 installed, 5.33.1 pinned"),
    (lambda root: _fake_modules(root, code="'</SCRIPT>'"), "contains '</script'"),
    (lambda root: _fake_modules(root, code="'{plot_divs}'"), "placeholder {plot_divs}"),
], ids=["other-version", "script-end-tag", "dvc-placeholder"])
def test_builder_refuses_builds_it_cannot_inline(tmp_path, modules, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        _builder().build(modules(tmp_path))


def test_builder_writes_the_page_whole_or_not_at_all(tmp_path):
    builder = _builder()
    with pytest.raises(SystemExit, match="cannot write .*missing/offline.html: No such file"):
        builder.write_page("<html>", tmp_path / "missing" / "offline.html")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match="cannot write .*folder: Is a directory"):
        builder.write_page("<html>", tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder"]  # no partial file left
    builder.write_page("<html>", tmp_path / "offline.html")
    assert (tmp_path / "offline.html").read_text() == "<html>"


def test_builder_without_npm_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="npm install vega@5.33.1 .* failed"):
        _builder().install(tmp_path)


def test_dvc_plots_show_draws_every_chart_offline(chromium, project_plots_repo, tmp_path):
    out = tmp_path / "shown"
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)],
                           cwd=project_plots_repo, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    page = out / "index.html"
    head, _, body = page.read_text(encoding="utf8").rpartition("</head>")
    assert "cdn.jsdelivr" not in head
    definitions = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    images = re.findall(r'<img src="([^"]+)"', body)
    assert len(images) == len(set(images)) == sum(isinstance(entry, str) for entry in definitions)
    charts = _charts(page, _dump_dom(chromium, page, tmp_path / "profile"))
    assert len(charts) == sum(isinstance(entry, dict) for entry in definitions)
    blank = [name for name, html in charts.items() if not re.search(r"<canvas[^>]+marks", html)]
    assert blank == []


def test_dvc_default_page_is_blank_offline(chromium, tmp_path):
    """The control: with DVC's own page (scripts from a CDN) the same browser draws nothing, so
    the check above fails when the scripts are not inlined."""
    renderer = VegaRenderer([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], "loss.tsv",
                            x="step", y="loss")
    page = tmp_path / "page.html"
    render_html([renderer], page, html_template=PAGE_HTML)
    charts = _charts(page, _dump_dom(chromium, page, tmp_path / "profile"))
    assert len(charts) == 1
    assert not any("<canvas" in html for html in charts.values())


def test_confusion_matrix_keeps_classes_never_predicted(chromium, tmp_path):
    datapoints = [{"label": label, "predicted": predicted, "rev": "workspace",
                   "filename": "mobilenet_attention/predictions.csv"}
                  for label, predicted in PREDICTIONS]
    spec = VegaRenderer(datapoints, "confusion", x="predicted", y="label", title="confusion",
                        template=str(DVC_DIR / "plots" / "confusion_all_classes.json"),
                        ).get_filled_template()
    chart = ('<div id="chart"></div><script>vegaEmbed("#chart", '
             f'{json.dumps(spec)}, {{"renderer": "svg"}});</script>')
    page = tmp_path / "confusion.html"
    page.write_text(TEMPLATE.read_text(encoding="utf8").replace("{plot_divs}", chart))
    dom = _dump_dom(chromium, page, tmp_path / "profile")
    classes = "basophil, eosinophil, ig, platelet"
    assert f"X-axis titled 'predicted' for a discrete scale with 4 values: {classes}" in dom
    assert f"Y-axis titled 'label' for a discrete scale with 4 values: {classes}" in dom
    cells = {(label, predicted): int(images) for predicted, label, images in re.findall(
        r'aria-label="predicted: (\w+); label: (\w+); images: (\d+)"', dom)}
    assert len(cells) == 16  # every class x every class, the empty ones drawn as zeros
    assert cells[("ig", "ig")] == 0 and cells[("platelet", "basophil")] == 0
    assert cells[("ig", "platelet")] == 1 and cells[("basophil", "eosinophil")] == 1
    assert sum(cells.values()) == len(PREDICTIONS)
