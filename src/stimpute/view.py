"""The block in 3D as one self-contained HTML page: `stimpute view OUT`, `stimpute.pl.view`.

The page embeds plotly.js (from the `plotly` package, so it opens offline, from disk, with
no server) and draws, in the block's registered frame in µm:
- every section's H&E as a textured plane at its depth z (a downsampled texture warped by
  the affine map that takes the section's own pixels to the frame, fitted on its spots;
  glass is transparent);
- every spot as a disc of its true diameter just above its section, coloured by the gene
  typed in the search box (panel genes listed), on a scale set by the 1st-99th percentile
  of the imputed values; measured spots carry a dark ring inside their disc;
- optionally each spot's confidence (or reach) instead of the gene;
- beside each imputed section whose measured counts are known, its measured values;
- a label per section; a range of sections to show; rotate, zoom and pan (Plotly).

Values are stored as 8-bit steps of each gene's maximum (1/255 of it), so the panel of a
10 × 4,000-spot Visium block fits in the page.
It reads result fields only (`stimpute.io.results`: `block.h5ad` or per-section results,
and `stimpute.tl.impute`'s AnnData objects): it computes nothing about expression.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np

from stimpute.errors import StimputeError
from stimpute.files import write_text_atomic
from stimpute.io.results import BLOCK_FILE, block_library, result_field
from stimpute.register.masks import relative_density, tissue_mask

VIEW_FILE = "view.html"
TEXTURE_SIDE = 256  # texture cells along the frame's long side
TEXTURE_COLOURS = 63  # palette of a texture; index 0 is transparent glass
MARKER_GENES = ("ERBB2", "MDK")
PERCENTILES = (1.0, 99.0)  # colour scale: robust range of the imputed values
GLASS_OD = 0.08  # summed optical density over the slide's glass below which a texture cell is glass
RING = 0.7  # measured spots: dark ring from this fraction of the radius to the rim
REACH_COLUMNS = ("stimpute_reach", "cli_reach")  # issue 26 renames cli_reach
TRUTH_LAYERS = ("measured", "stimpute_measured")


@dataclass
class ViewSection:
    """What the view draws of one section, read from result fields."""

    name: str
    measured: np.ndarray  # (n,) bool: measured spot
    xyz: np.ndarray  # (n, 3) µm, registered frame
    xy_px: np.ndarray  # (n, 2) own full-resolution pixels
    image: np.ndarray | None  # H&E (hires or lowres) and its px per full-resolution px
    image_scale: float
    diameter_um: float
    values: np.ndarray  # (n, genes) log1p
    truth: np.ndarray | None  # (n, genes) measured values of an imputed section
    confidence: np.ndarray | None
    reach: np.ndarray | None


def read_view_sections(data, key: str = "stimpute") -> tuple[list[str], list[ViewSection]]:
    """Panel genes and sections of a `block.h5ad` AnnData, a result folder or file, or
    `stimpute.tl.impute`'s objects (list or mapping; their `layers[key]`, `obs[key_*]`)."""
    if isinstance(data, (str, Path)):
        path = Path(data) / BLOCK_FILE if Path(data).is_dir() else Path(data)
        if not path.is_file():
            raise StimputeError(data, f"no {BLOCK_FILE} here: give the output folder of `stimpute impute`")
        data = ad.read_h5ad(path)
    objects = [data] if isinstance(data, ad.AnnData) else list(data.values() if isinstance(data, Mapping) else data)
    if not objects:
        raise StimputeError(None, "nothing to view: no sections given")
    meta = dict(objects[0].uns.get("stimpute", {}))
    if len(objects) == 1 and meta.get("block"):
        block = objects[0]
        records = {name: dict(meta["sections"][name]) for name in meta["order"]}
        sections = [_view_section(name, block[(block.obs["section"] == name).to_numpy()], block_library(block.uns, name),
                                  "spatial_section", key, rec) for name, rec in records.items()]
        return list(block.var_names), sections
    names = list(data) if isinstance(data, Mapping) else [_library_name(a, i) for i, a in enumerate(objects)]
    sections = [_view_section(str(n), a, _one_library(a, str(n)), "spatial", key, dict(a.uns.get("stimpute", {})))
                for n, a in zip(names, objects)]
    genes = list(objects[0].var_names)
    if any(list(a.var_names) != genes for a in objects):
        raise StimputeError(None, "the sections do not share one gene panel (var_names differ)")
    return genes, sections


def _view_section(name: str, part: ad.AnnData, library: dict, own_px: str, key: str, record: dict) -> ViewSection:
    for field in ("spatial_3d", own_px):
        if field not in part.obsm:
            raise StimputeError(name, f'no obsm["{field}"]: not a stimpute result (run stimpute impute or stimpute.tl.impute)')
    obs = part.obs
    flag = next((c for c in ("measured", f"{key}_measured") if c in obs), None)
    measured = obs[flag].to_numpy(bool) if flag else np.full(part.n_obs, bool(record.get("measured", False)))
    truth_layer = next((t for t in TRUTH_LAYERS if t in part.layers), None)
    no_counts = record.get("has_counts") is False  # the layer holds zeros there (older files: NaN)
    truth = None if truth_layer is None or measured.all() or no_counts else _dense(part.layers[truth_layer])
    reach = next((c for c in (f"{key}_reach", *REACH_COLUMNS) if c in obs), None)
    confidence = result_field(obs, key, "confidence", "confidence")
    images, factors = dict(library.get("images", {})), dict(library.get("scalefactors", {}))
    image, scale = None, 1.0
    for kind, factor in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if kind in images and factor in factors:
            image, scale = np.asarray(images[kind]), float(factors[factor])
            break
    xy_px = np.asarray(part.obsm[own_px], np.float64)[:, :2]
    xyz = np.asarray(part.obsm["spatial_3d"], np.float64)
    diameter = record.get("spot_diameter_um")
    if diameter is None and "spot_diameter_fullres" in factors:
        diameter = float(factors["spot_diameter_fullres"]) * _um_per_px(xy_px, xyz)
    return ViewSection(name=name, measured=measured, xyz=xyz, xy_px=xy_px, image=image, image_scale=scale,
                       diameter_um=float(diameter or 0.5 * _spacing(xyz[:, :2])), values=_dense(part.X),
                       truth=None if truth is None or np.isnan(truth).all() else np.nan_to_num(truth),
                       confidence=None if confidence is None else confidence.to_numpy(np.float64),
                       reach=obs[reach].to_numpy(np.float64) if reach else None)


def _one_library(adata: ad.AnnData, name: str) -> dict:
    spatial = dict(adata.uns.get("spatial", {}))
    return dict(spatial.get(name) or (next(iter(spatial.values())) if len(spatial) == 1 else {}))


def _library_name(adata: ad.AnnData, i: int) -> str:
    meta, spatial = dict(adata.uns.get("stimpute", {})), list(dict(adata.uns.get("spatial", {})))
    return str(meta.get("section") or (spatial[0] if len(spatial) == 1 else f"section{i}"))


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, np.float32)


def _spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else 100.0


def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """(3, 2) least-squares affine map with `[src, 1] @ A ≈ dst`; None when the points are
    too few or collinear."""
    if len(src) < 3:
        return None
    design = np.c_[src, np.ones(len(src))]
    if np.linalg.matrix_rank(design) < 3:
        return None
    return np.linalg.lstsq(design, dst, rcond=None)[0]


def _um_per_px(xy_px: np.ndarray, xyz: np.ndarray) -> float:
    a = _affine(xy_px, xyz[:, :2])
    return float(np.sqrt(abs(np.linalg.det(a[:2])))) if a is not None else 1.0


@dataclass
class Frame:
    """The texture grid in the registered frame: origin (µm), cell size (µm), cells."""

    x0: float
    y0: float
    step: float
    nx: int
    ny: int

    @classmethod
    def around(cls, sections: Sequence[ViewSection]) -> "Frame":
        xy = np.concatenate([s.xyz[:, :2] for s in sections])
        pad = max(max(s.diameter_um for s in sections), 0.04 * float(np.ptp(xy, axis=0).max()))
        lo, hi = xy.min(0) - pad, xy.max(0) + pad
        step = float((hi - lo).max()) / TEXTURE_SIDE
        nx, ny = (np.ceil((hi - lo) / step).astype(int) + 1).tolist()
        return cls(float(lo[0]), float(lo[1]), step, nx, ny)

    @property
    def x(self) -> np.ndarray:
        return self.x0 + self.step * np.arange(self.nx)

    @property
    def y(self) -> np.ndarray:
        return self.y0 + self.step * np.arange(self.ny)


def texture(section: ViewSection, frame: Frame) -> tuple[np.ndarray, list[str]] | None:
    """The section's H&E resampled on `frame`: (ny, nx) uint8 palette indices (0: glass
    or off the image) and the palette (`rgb(...)`, ordered by lightness); None without
    an image or an affine fit."""
    import cv2
    from PIL import Image

    fit = _affine(section.xyz[:, :2], section.xy_px * section.image_scale) if section.image is not None else None
    if fit is None:
        return None
    image = np.ascontiguousarray(section.image[..., :3])
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    # cell (c, r) -> frame µm -> image px; shrink the image first so no detail aliases
    cell = np.array([[frame.step, 0.0, frame.x0], [0.0, frame.step, frame.y0], [0.0, 0.0, 1.0]])
    to_image = fit.T @ cell
    shrink = min(1.0, 1.5 / max(float(np.sqrt(abs(np.linalg.det(to_image[:, :2])))), 1e-9))
    if shrink < 1.0:
        size = (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink)))
        to_image = np.diag([size[0] / image.shape[1], size[1] / image.shape[0]]) @ to_image
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(image, to_image, (frame.nx, frame.ny), flags=flags, borderValue=(255, 255, 255))
    inside = cv2.warpAffine(np.ones(image.shape[:2], np.uint8), to_image, (frame.nx, frame.ny), flags=flags) > 0
    # tissue: the section's tissue mask, or near its spots (pale tissue Otsu leaves out); never glass
    near = np.zeros((frame.ny, frame.nx), np.uint8)
    cells = np.round((section.xyz[:, :2] - [frame.x0, frame.y0]) / frame.step).astype(int)
    cells = cells[(cells >= 0).all(1) & (cells < [frame.nx, frame.ny]).all(1)]
    near[cells[:, 1], cells[:, 0]] = 1
    reach = max(1, round(_spacing(section.xyz[:, :2]) / frame.step))
    near = cv2.dilate(near, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))) > 0
    tissue = tissue_mask(warped, frame.step, smooth_um=2 * frame.step, close_um=4 * frame.step) | near
    shown = inside & tissue & (cv2.GaussianBlur(relative_density(warped), (0, 0), 1.0) > GLASS_OD)
    quantised = Image.fromarray(warped).quantize(TEXTURE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette = np.asarray(quantised.getpalette()[: 3 * TEXTURE_COLOURS], np.float64).reshape(-1, 3)
    order = np.argsort(palette @ [0.299, 0.587, 0.114], kind="stable")  # by lightness: blends stay plausible
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    index = np.where(shown, rank[np.asarray(quantised)] + 1, 0).astype(np.uint8)
    colours = ["rgb(255,255,255)"] + [f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in palette[order]]
    return index, colours


def _steps(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    """(genes, spots) uint8: each value in 1/255 steps of its gene's maximum `top`."""
    return np.round(np.clip(values, 0, None) / top * 255).astype(np.uint8).T


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def default_gene(genes: Sequence[str], sections: Sequence[ViewSection]) -> str:
    """A marker gene of the panel, else the most variable imputed gene."""
    for gene in MARKER_GENES:
        if gene in genes:
            return gene
    values = np.concatenate([s.values for s in sections])
    return genes[int(np.argmax(values.var(0)))]


def warm_plotly() -> None:
    """Do plotly's first-figure work for the trace types the view draws: import their classes
    and read its property validators (a 3 MB JSON), so that a run's preloading thread pays
    for it (`stimpute.preload`), not its writing stage."""
    import plotly.graph_objects as go

    go.Figure([go.Surface(), go.Mesh3d(), go.Scatter3d()], go.Layout(title=dict(text="")))


def build_view(data, gene: str | None = None, key: str = "stimpute", title: str = "stimpute view"):
    """The Plotly figure of the block (`gene` shown) and the page's data for its controls."""
    import plotly.graph_objects as go

    genes, sections = read_view_sections(data, key)
    gene = gene or default_gene(genes, sections)
    if gene not in genes:
        raise StimputeError(None, f"gene {gene} is not in the panel ({len(genes)} genes, e.g. {', '.join(genes[:5])})")
    g = genes.index(gene)
    frame = Frame.around(sections)
    n_spots = sum(len(s.values) for s in sections)
    sides = 12 if n_spots <= 20000 else 6
    depths = sorted({float(np.median(s.xyz[:, 2])) for s in sections})
    gap = min(np.diff(depths)) if len(depths) > 1 else 10.0
    lift = 0.04 * gap  # spots above their plane, no depth fighting
    shift = frame.nx * frame.step + 2 * frame.step  # measured copy of a target, beside it
    values = np.concatenate([s.values for s in sections])
    imputed = values[~np.concatenate([s.measured for s in sections])]
    lo, hi = np.percentile(imputed if len(imputed) else values, PERCENTILES, axis=0)
    hi = np.maximum(hi, lo + 1e-3)
    truths = [s.truth for s in sections if s.truth is not None]
    top = np.max([values.max(0)] + [t.max(0) for t in truths], axis=0)
    top = np.where(top > 0, top, 1.0)

    traces, roles, start, truth_start = [], [], 0, 0
    surface = dict(showscale=False, cmin=0, cmax=TEXTURE_COLOURS, hoverinfo="skip",
                   lighting=dict(ambient=1.0, diffuse=0.0, specular=0.0, fresnel=0.0),
                   opacityscale=[[0, 0], [1 / TEXTURE_COLOURS, 1], [1, 1]])
    mesh = dict(coloraxis="coloraxis", flatshading=True, lighting=dict(ambient=1.0, diffuse=0.0, specular=0.0, fresnel=0.0))
    for s_index, s in enumerate(sections):
        z = float(np.median(s.xyz[:, 2]))
        made = texture(s, frame)
        measured = bool(s.measured.all())
        state = "measured" if measured else ("imputed" if not s.measured.any() else "measured + imputed")
        copies = [(0.0, state, "values", start)] + ([(shift, "measured", "truth", truth_start)] if s.truth is not None else [])
        for dx, label, source, first in copies:
            beside = bool(dx)
            if made is not None:  # its z grid is filled in by the page (a constant: not worth shipping)
                index, colours = made
                traces.append(go.Surface(x=frame.x + dx, y=frame.y, surfacecolor=index, name=f"{s.name} H&E",
                                         colorscale=[[i / TEXTURE_COLOURS, c] for i, c in enumerate(colours)], **surface))
                roles.append({"section": s_index, "role": "he", "beside": beside, "z": z, "nx": index.shape[1], "ny": index.shape[0]})
            xyz = (s.xyz + [dx, 0.0, lift]).astype(np.float32)
            ringed = s.measured if source == "values" else np.ones(len(s.values), bool)
            # discs and rings are built by the page from their centres and radii
            traces.append(go.Mesh3d(name=f"{s.name} {label}", **mesh,
                                    hovertemplate=f"{s.name} {label}<br>x %{{x:.0f}} µm, y %{{y:.0f}} µm, z {z:g} µm"
                                                  "<br>%{intensity:.2f}<extra></extra>"))
            roles.append({"section": s_index, "role": "spots", "source": source, "start": int(first), "count": len(s.values),
                          "beside": beside, "centres": _b64(xyz), "r_in": 0.0, "r_out": s.diameter_um / 2, "sides": sides})
            if ringed.any():
                traces.append(go.Mesh3d(color="rgb(20,20,20)", flatshading=True, hoverinfo="skip", name=f"{s.name} measured",
                                        lighting=mesh["lighting"]))
                roles.append({"section": s_index, "role": "ring", "beside": beside, "centres": _b64(xyz[ringed] + np.float32([0, 0, lift / 2])),
                              "r_in": RING * s.diameter_um / 2, "r_out": s.diameter_um / 2, "sides": sides})
            traces.append(go.Scatter3d(x=[frame.x0 + dx], y=[frame.y0 + frame.ny * frame.step], z=[z], mode="text",
                                       text=[f"<b>{s.name}</b> {label}"], textposition="top right",  # front left corner
                                       textfont=dict(size=14, color="black"), hoverinfo="skip", showlegend=False))
            roles.append({"section": s_index, "role": "label", "beside": beside})
        start += len(s.values)
        truth_start += 0 if s.truth is None else len(s.truth)

    width = frame.nx * frame.step + (shift if truths else 0.0)
    height = frame.ny * frame.step
    longest = max(width, height)
    back = float(np.clip(1 + 0.9 * (min(width, height) / longest - 0.45) / 0.55, 1.0, 1.9))  # a deep box needs the camera further back
    layout = go.Layout(
        title=dict(text=title, x=0.01, font=dict(size=14)), margin=dict(l=0, r=0, t=30, b=0), showlegend=False,
        paper_bgcolor="white", uirevision="stimpute",
        coloraxis=dict(colorscale="Viridis", cmin=float(lo[g]), cmax=float(hi[g]),
                       colorbar=dict(title=dict(text=f"{gene}<br>log1p"), len=0.6)),
        scene=dict(
            xaxis=dict(title=dict(text="x (µm)"), range=[frame.x0, frame.x0 + width], tickformat="d"),
            yaxis=dict(title=dict(text="y (µm)"), range=[frame.y0 + height, frame.y0], tickformat="d"),  # image rows grow downwards
            zaxis=dict(title=dict(text="z (µm)"), range=[depths[0] - gap / 2, depths[-1] + gap / 2], tickformat="d"),
            aspectmode="manual", aspectratio=dict(x=width / longest, y=height / longest, z=0.45 if len(depths) > 1 else 0.05),
            camera=dict(eye=dict(x=0.05 * back, y=-0.85 * back, z=0.6 * back), center=dict(x=0, y=0, z=-0.08), up=dict(x=0, y=0, z=1)),
        ),
    )
    figure = go.Figure(traces, layout)
    payload = {
        "genes": genes, "gene": gene, "lo": lo.round(4).tolist(), "hi": hi.round(4).tolist(), "top": top.round(5).tolist(),
        "values": _b64(_steps(values, top)), "n": int(n_spots),
        "truth": _b64(_steps(np.concatenate(truths), top)) if truths else "", "n_truth": int(sum(len(t) for t in truths)),
        "sections": [s.name for s in sections], "traces": roles,
        "overlays": {name: _b64(np.nan_to_num(np.concatenate(arrays), nan=0.0).astype(np.float32))
                     for name, arrays in (("confidence", [s.confidence for s in sections]), ("reach", [s.reach for s in sections]))
                     if all(v is not None for v in arrays)},
    }
    return figure, payload


def view_html(data, gene: str | None = None, key: str = "stimpute", title: str = "stimpute view") -> str:
    """The self-contained page (plotly.js inline, no network): figure, search box, controls."""
    from plotly.offline import get_plotlyjs

    figure, payload = build_view(data, gene, key, title)
    options = "".join(f'<option value="{html.escape(g)}">' for g in payload["genes"])
    sections = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, n in enumerate(payload["sections"]))
    overlays = "".join(f'<option value="{o}">{o}</option>' for o in payload["overlays"])
    page = PAGE.format(title=html.escape(title), plotly=get_plotlyjs(), options=options, sections=sections,
                       last=len(payload["sections"]) - 1, overlays=overlays, gene=html.escape(payload["gene"]),
                       n_genes=len(payload["genes"]), figure=figure.to_json(), payload=json.dumps(payload).replace("</", "<\\/"), script=SCRIPT)
    return page


def write_view(data, path: str | Path, gene: str | None = None, key: str = "stimpute", title: str | None = None) -> Path:
    """Write the page to `path` atomically."""
    path = Path(path)
    return write_text_atomic(path, view_html(data, gene, key, title or f"stimpute view · {path.parent.name}"))


class View:
    """`stimpute.pl.view`'s result: the page (`html`, `write`, shown inline in a notebook)."""

    def __init__(self, page: str):
        self.html = page

    def write(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), self.html)

    def _repr_html_(self) -> str:
        return f'<iframe srcdoc="{html.escape(self.html)}" style="width:100%;height:720px;border:0"></iframe>'


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>{plotly}</script>
<style>
body {{ margin: 0; font: 13px system-ui, sans-serif; }}
#controls {{ display: flex; flex-wrap: wrap; gap: 14px; align-items: center; padding: 6px 10px; background: #f4f4f4; }}
#plot {{ width: 100vw; height: calc(100vh - 44px); }}
#note {{ color: #a00; }}
.key {{ display: inline-block; width: 11px; height: 11px; border-radius: 50%; vertical-align: middle; }}
</style></head><body>
<div id="controls">
<label>gene <input id="gene" list="genes" value="{gene}" size="12" title="{n_genes} genes in the panel"></label>
<datalist id="genes">{options}</datalist>
<label>colour <select id="colour"><option value="gene">gene</option>{overlays}</select></label>
<label>sections <select id="from">{sections}</select> to <select id="to">{sections}</select></label>
<label><input type="checkbox" id="he" checked> H&amp;E</label>
<label><input type="checkbox" id="beside" checked> measured beside imputed</label>
<span><span class="key" style="background:#6c6;box-shadow:inset 0 0 0 3px #141414"></span> measured
<span class="key" style="background:#6c6"></span> imputed · discs at true spot size · µm</span>
<span id="note"></span>
</div>
<div id="plot"></div>
<script>
const FIGURE = {figure};
const DATA = {payload};
document.getElementById("to").value = "{last}";
{script}
</script></body></html>
"""

SCRIPT = """
function decode(text, Type) {
  const chars = atob(text), bytes = new Uint8Array(chars.length);
  for (let i = 0; i < chars.length; i++) bytes[i] = chars.charCodeAt(i);
  return new Type(bytes.buffer);
}
const VALUES = decode(DATA.values, Uint8Array);
const TRUTH = DATA.truth ? decode(DATA.truth, Uint8Array) : null;
const OVERLAYS = Object.fromEntries(Object.entries(DATA.overlays).map(([k, v]) => [k, decode(v, Float32Array)]));
const SPOTS = DATA.traces.map((t, i) => [t, i]).filter(([t]) => t.role === "spots");

function discs(c, rIn, rOut, sides) {  // flat discs (rIn 0) or rings around centres c (x, y, z, ...)
  const n = c.length / 3, per = rIn ? 2 * sides : sides + 1, tris = rIn ? 2 * sides : sides;
  const x = new Float32Array(n * per), y = new Float32Array(n * per), z = new Float32Array(n * per);
  const i = new Uint32Array(n * tris), j = new Uint32Array(n * tris), k = new Uint32Array(n * tris);
  const radii = rIn ? [rIn, rOut] : [rOut];
  for (let s = 0; s < n; s++) {
    const v0 = s * per, f0 = s * tris;
    let v = v0;
    if (!rIn) { x[v] = c[3 * s]; y[v] = c[3 * s + 1]; z[v] = c[3 * s + 2]; v++; }
    for (const r of radii) for (let a = 0; a < sides; a++, v++) {
      x[v] = c[3 * s] + r * Math.cos(2 * Math.PI * a / sides); y[v] = c[3 * s + 1] + r * Math.sin(2 * Math.PI * a / sides);
      z[v] = c[3 * s + 2];
    }
    for (let a = 0; a < sides; a++) {
      const b = (a + 1) % sides;
      if (!rIn) { i[f0 + a] = v0; j[f0 + a] = v0 + 1 + a; k[f0 + a] = v0 + 1 + b; continue; }
      i[f0 + 2 * a] = v0 + a; j[f0 + 2 * a] = v0 + b; k[f0 + 2 * a] = v0 + sides + a;
      i[f0 + 2 * a + 1] = v0 + b; j[f0 + 2 * a + 1] = v0 + sides + b; k[f0 + 2 * a + 1] = v0 + sides + a;
    }
  }
  return {x, y, z, i, j, k};
}

DATA.traces.forEach((t, n) => {  // geometry the page builds rather than ships
  const trace = FIGURE.data[n];
  if (t.centres) Object.assign(trace, discs(decode(t.centres, Float32Array), t.r_in, t.r_out, t.sides));
  if (t.role === "he") {
    trace.z = Array.from({length: t.ny}, () => new Float32Array(t.nx).fill(t.z));
  }
});
const plot = document.getElementById("plot");

function intensities(g, colour) {
  return SPOTS.map(([t]) => {
    const per = t.sides + 1, out = new Float32Array(t.count * per);
    for (let s = 0; s < t.count; s++) {
      let v;
      if (colour === "gene") {
        const source = t.source === "truth" ? TRUTH : VALUES, n = t.source === "truth" ? DATA.n_truth : DATA.n;
        v = source[g * n + t.start + s] / 255 * DATA.top[g];
      } else {
        v = t.source === "truth" ? 1 : OVERLAYS[colour][t.start + s];
      }
      out.fill(v, s * per, (s + 1) * per);
    }
    return out;
  });
}

function draw() {
  const name = document.getElementById("gene").value.trim(), colour = document.getElementById("colour").value;
  const g = DATA.genes.indexOf(name);
  const note = document.getElementById("note");
  if (colour === "gene" && g < 0) { note.textContent = name + " is not in the panel"; return Promise.resolve(); }
  note.textContent = "";
  const scale = colour === "gene"
    ? {"coloraxis.cmin": DATA.lo[g], "coloraxis.cmax": DATA.hi[g], "coloraxis.colorscale": "Viridis",
       "coloraxis.colorbar.title.text": name + "<br>log1p"}
    : {"coloraxis.cmin": 0, "coloraxis.cmax": 1, "coloraxis.colorscale": "Cividis", "coloraxis.colorbar.title.text": colour};
  return Plotly.restyle(plot, {intensity: intensities(g, colour)}, SPOTS.map(([, i]) => i))
    .then(() => Plotly.relayout(plot, scale))
    .then(() => { document.body.dataset.shown = colour === "gene" ? name : colour; });
}

function visibility() {
  const a = +document.getElementById("from").value, b = +document.getElementById("to").value;
  const he = document.getElementById("he").checked, beside = document.getElementById("beside").checked;
  const visible = DATA.traces.map(t => Math.min(a, b) <= t.section && t.section <= Math.max(a, b)
    && (t.role !== "he" || he) && (!t.beside || beside));
  return Plotly.restyle(plot, {visible: visible}).then(() => { document.body.dataset.sections = Math.min(a, b) + "-" + Math.max(a, b); });
}

const first = intensities(DATA.genes.indexOf(DATA.gene), "gene");
SPOTS.forEach(([, n], s) => { FIGURE.data[n].intensity = first[s]; });
Plotly.newPlot(plot, FIGURE.data, FIGURE.layout, {responsive: true, displaylogo: false}).then(() => {
  document.body.dataset.shown = DATA.gene;
  document.getElementById("gene").addEventListener("change", draw);
  document.getElementById("gene").addEventListener("input", e => { if (DATA.genes.includes(e.target.value)) draw(); });
  document.getElementById("colour").addEventListener("change", draw);
  for (const id of ["from", "to", "he", "beside"]) document.getElementById(id).addEventListener("change", visibility);
});
"""
