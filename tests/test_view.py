"""The 3D view (`stimpute view`, `OUT/view.html`, `stimpute.pl.view`): its content, its
command, and the page in a real headless browser (Chromium through Selenium)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stimpute.errors import StimputeWarning
from stimpute.files import read_manifest
from stimpute.view import build_view, read_view_sections
from tests.helpers import one_error_line, run_cli


@pytest.fixture(scope="module")
def out(image_section_impute, tmp_path_factory) -> Path:
    """A copy of `stimpute impute` on a small synthetic stack (conftest): S0 measured (known);
    he_1, an H&E image alone, and S2 imputed, S2 carrying counts (so its measured values are
    shown beside). A copy: `stimpute view` here redraws its view.html."""
    return shutil.copytree(image_section_impute, tmp_path_factory.mktemp("view") / "out")


def test_impute_writes_a_self_contained_view(out):
    page = (out / "view.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=", page)  # plotly.js inline: nothing to fetch
    assert len(page) < 8e6 and page.count('<option value="GENE') == 20  # the search box lists the panel
    block = ad.read_h5ad(out / "block.h5ad")
    truth = block.layers["measured"]
    on = {name: (block.obs["section"] == name).to_numpy() for name in ("S0", "he_1", "S2")}
    assert np.isfinite(truth).all() and not truth[on["he_1"]].any() and truth[on["S2"]].any()  # he_1 has no counts: zeros
    assert not block.uns["stimpute"]["sections"]["he_1"]["has_counts"] and block.uns["stimpute"]["sections"]["S2"]["has_counts"]
    assert np.array_equal(truth[on["S0"]], block.X[on["S0"]])


def test_view_draws_textures_true_size_spots_and_measured_beside(out):
    genes, sections = read_view_sections(out)
    figure, data = build_view(out, gene=genes[3])
    kinds = [t.type for t in figure.data]
    assert kinds.count("surface") == 4  # S0, he_1, S2 and S2's measured copy beside it
    texture = next(t for t in figure.data if t.type == "surface")
    index, x, y = np.asarray(texture.surfacecolor), np.asarray(texture.x), np.asarray(texture.y)
    under = index[np.searchsorted(y, sections[0].xyz[:, 1]), np.searchsorted(x, sections[0].xyz[:, 0])]
    assert (under > 0).mean() > 0.5 and (index == 0).any()  # S0's H&E shown under its spots, glass transparent
    spots = [r for r in data["traces"] if r["role"] == "spots"]  # discs the page builds: centres (µm) and radius
    assert [r["source"] for r in spots] == ["values", "values", "values", "truth"]
    centres = np.frombuffer(base64.b64decode(spots[0]["centres"]), np.float32).reshape(-1, 3)
    assert np.allclose(centres[:, :2], sections[0].xyz[:, :2], atol=1e-3) and (centres[:, 2] > sections[0].xyz[:, 2]).all()
    assert spots[0]["r_out"] == pytest.approx(sections[0].diameter_um / 2) and sections[0].diameter_um == pytest.approx(55.0)
    rings = [r for r in data["traces"] if r["role"] == "ring"]
    assert [r["section"] for r in rings] == [0, 2]  # measured spots (S0, and S2's measured copy) are ringed
    imputed = np.concatenate([s.values[:, 3] for s in sections if not s.measured.any()])
    scale = figure.layout.coloraxis
    assert (scale.cmin, scale.cmax) == pytest.approx(tuple(np.percentile(imputed, [1, 99])), abs=1e-3) and scale.cmin >= 0
    scene = figure.layout.scene
    assert [scene[a].title.text for a in ("xaxis", "yaxis", "zaxis")] == ["x (µm)", "y (µm)", "z (µm)"]
    assert set(data["overlays"]) == {"confidence", "reach"} and data["gene"] == genes[3] and data["genes"] == genes


def test_view_command_and_python_api(out, tmp_path):
    genes = list(ad.read_h5ad(out / "block.h5ad").var_names)
    result = run_cli("view", out, "--gene", genes[5])  # redraws OUT/view.html; the folder stays impute's
    assert result.exit_code == 0 and f'"gene": "{genes[5]}"' in (out / "view.html").read_text(), result.output
    manifest = read_manifest(out)
    assert manifest["command"] == "impute" and manifest["status"] == "finished" and "view.html" in manifest["files"]
    result = run_cli("view", out, "--gene", genes[5], "--html", tmp_path / "v.html")
    assert result.exit_code == 0, result.output
    assert f'"gene": "{genes[5]}"' in (tmp_path / "v.html").read_text()
    one_error_line(run_cli("view", out, "--gene", "NOPE", "--html", tmp_path / "w.html"), "NOPE is not in the panel")
    one_error_line(run_cli("view", tmp_path), "no block.h5ad")
    import stimpute

    parts = [ad.read_h5ad(out / f"{name}.h5ad") for name in ("he_1", "S2")]  # per-section results, not a block
    page = stimpute.pl.view(parts, genes[2], path=tmp_path / "parts.html")
    assert (tmp_path / "parts.html").read_text() == page.html and "iframe" in page._repr_html_()
    fig = stimpute.pl.block_3d(parts, genes[2], layer="X")
    assert [t.get_text() for t in fig.axes[0].get_zticklabels()] == ["he_1 (imputed)", "S2 (imputed)"]


def test_a_failed_view_never_fails_the_impute(out, monkeypatch):
    import stimpute.view
    from stimpute.pipeline import write_impute_view

    def broken(*args, **kwargs):
        raise RuntimeError("no WebGL today")

    monkeypatch.setattr(stimpute.view, "write_view", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert write_impute_view(ad.read_h5ad(out / "block.h5ad"), out) == []
    assert any(issubclass(w.category, StimputeWarning) and "no WebGL today" in str(w.message) for w in caught)


# --- the page in a real browser --------------------------------------------------------

def _browser():
    """A headless Chromium driven by Selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no headless browser installed (apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--window-size=1200,800", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _canvas(browser, path: Path) -> np.ndarray:
    """Screenshot saved to `path`; returns the 3D scene's pixels (the left 80 % of the plot
    area: the colour bar sits at the right)."""
    from PIL import Image

    time.sleep(1.0)  # let WebGL finish the frame
    browser.save_screenshot(str(path))
    x, y, w, h = (int(v) for v in browser.execute_script(
        "const r = document.getElementById('plot').getBoundingClientRect(); return [r.left, r.top, r.width, r.height];"))
    return np.asarray(Image.open(path).convert("RGB"), np.int16)[y:y + h, x:x + int(0.8 * w)]


def _keep(paths) -> None:
    target = os.environ.get("STIMPUTE_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(target) / p.name)


def test_view_renders_in_a_headless_browser(out, tmp_path):
    """No console errors; the 3D canvas is drawn; another gene, the confidence overlay and
    one section alone each change the rendered pixels. Screenshots are kept."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    genes, sections = read_view_sections(out)
    values = np.concatenate([s.values for s in sections])
    shots = [tmp_path / f"view_{name}.png" for name in ("first_gene", "other_gene", "confidence", "one_section")]
    browser = _browser()
    try:
        body = lambda key, value: lambda b: b.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") == value  # noqa: E731
        browser.get((out / "view.html").resolve().as_uri())
        shown = WebDriverWait(browser, 120).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-shown"))
        first = _canvas(browser, shots[0])
        other = genes[int(np.argmin(np.corrcoef(values.T)[genes.index(shown)]))]  # the least alike
        box = browser.find_element(By.ID, "gene")
        box.clear()
        box.send_keys(other + "\n")
        WebDriverWait(browser, 60).until(body("shown", other))
        second = _canvas(browser, shots[1])
        Select(browser.find_element(By.ID, "colour")).select_by_value("confidence")
        WebDriverWait(browser, 60).until(body("shown", "confidence"))
        confidence = _canvas(browser, shots[2])
        Select(browser.find_element(By.ID, "to")).select_by_value("0")
        WebDriverWait(browser, 60).until(body("sections", "0-0"))
        alone = _canvas(browser, shots[3])
        logs = browser.get_log("browser")
    finally:
        browser.quit()
    _keep(shots)
    assert not [entry for entry in logs if entry["level"] == "SEVERE"], logs
    assert _coloured(first) > 0.01 and (np.abs(first - 255).sum(axis=2) > 30).mean() > 0.2  # panes, textures, spots: not blank
    for before, after in ((first, second), (second, confidence)):
        assert (np.abs(after - before).sum(axis=2) > 30).mean() > 0.002  # the spots took other colours
    assert _coloured(alone) < 0.8 * _coloured(confidence)  # he_1 and S2 hidden


def _coloured(pixels: np.ndarray) -> float:
    """Share of pixels neither white nor the scene's pale panes: textures and spots."""
    return float(((np.abs(pixels - 255).sum(axis=2) > 80) & (np.abs(pixels - [229, 236, 246]).sum(axis=2) > 80)).mean())
