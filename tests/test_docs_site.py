"""The documentation site, built as `make docs` builds it and opened in headless Chromium as a
person would: the page renders, the navigation is there, its images load.

The screenshots are checked, not kept (they land in pytest's temp folder). Chromium comes
from the distribution's packages (`.ci/run` installs it); without it the browser checks skip
and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# after the page's load event, how many of its images decoded: written where --dump-dom shows it
PROBE = ("<script>addEventListener('load', () => { const all = [...document.images]; "
         "document.body.setAttribute('data-images-loaded', all.filter(i => i.complete && "
         "i.naturalWidth > 0).length + '/' + all.length); });</script>")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs tools are dev dependencies (pip install "
                                         "-e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_site_builds_strictly_with_every_page_of_the_nav(site):
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, list):
            for item in entry:
                yield from pages(item)
        else:
            for value in entry.values():
                yield from pages(value)

    for page in pages(nav):
        folder, _, stem = page.removesuffix(".md").rpartition("/")
        # a folder's index (or README) is that folder's page; any other page gets its own
        parts = [folder] if stem in ("index", "README") else [folder, stem]
        built = site.joinpath(*filter(None, parts), "index.html")
        assert built.exists(), f"{page} was not built ({built})"
    reference = (site / "reference" / "index.html").read_text()
    assert "leantrain.run.fit.fit" in reference  # mkdocstrings rendered the docstrings
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    assert "tune_digits.py" in benchmarks and "Intel(R) Xeon(R) Processor" in benchmarks


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium here (apt-get install chromium; .ci/run installs it)")


def _open(browser: str, page: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars",
                           "--window-size=1280,900", "--virtual-time-budget=5000", *flags,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("page, title", [("index.html", "leantrain"),
                                         ("bench/index.html", "leantrain bench")])
def test_a_page_renders_in_chromium_with_navigation_and_its_images(site, tmp_path, page,
                                                                   title):
    from PIL import Image, ImageStat

    browser = _browser()
    probed = site / page
    probed.write_text(probed.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "page.png"
    done = _open(browser, probed, f"--screenshot={shot}")
    if not shot.exists():
        pytest.skip(f"Chromium could not start here: {done.stderr.strip()[-300:]}")
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 900)
    assert ImageStat.Stat(image).stddev[0] > 10  # text and chrome drawn, not a blank page
    dom = _open(browser, probed, "--dump-dom").stdout
    assert title in dom and 'class="md-nav' in dom  # the page and its navigation
    assert "Bring your model" in dom and "Benchmarks" in dom
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load event never ran"
    assert loaded[1] == loaded[2], f"images loaded: {loaded[1]} of {loaded[2]}"
    if page.startswith("bench/"):
        assert int(loaded[2]) >= 2  # the bench and CPU-ceiling charts
