"""Patch extraction and encoder benchmark (issue 4), on 2 CPU cores.

Parts (`--parts`, default all):
- `extract`: C3 patch extraction, all spots × 3 scales, batch-size sweep (patches/s, peak RSS);
  writes a montage of a few spots at the three scales (`--figs`).
- `encoders`: patches/s of each encoder at 224 px on C3 patches, batch-size sweep, peak RSS
  (networks randomly initialised: no pretrained weights exist offline; speed is the same).
- `wsi`: a 10,000-spot synthetic pyramidal TIFF (tiled, JPEG, written tile by tile):
  extraction of all spots × 3 scales in bounded memory (peak RSS vs. image size).
- `cache`: ResNet-18 features of C2, C3, C4 computed and cached, then read back (times).
- `throughput` (issue 16): handcrafted feature extraction end to end (`spot_features`: read
  + resample + descriptors, every spot × 3 scales, no cache) on a synthetic Visium pyramidal
  TIFF (1 section × `--spots` spots, `stimpute.datasets.write_visium_block`, reused in OUT)
  and on HER2-ST C2+C3+C4: patches/s (best of `--runs`), CPU ms per patch of the reading
  process and of the worker processes, the load average, and CPU ms per patch of each
  descriptor part (one process, on a sample of the same patches). Target: >= 250 patches/s
  on 2 cores, i.e. <= 8 ms CPU a patch in all.
- `against` (issue 28): the handcrafted features of `--sections` (default: the synthetic Visium
  section of `throughput`) on this tree and on `--baseline` (a git ref or a tree's folder),
  interleaved, `--reps` repetitions: CPU ms per patch from `wait4` of fresh processes (one
  that computes the features minus one that only imports and reads), and patches/s.
- `ridge`: ridge regression from features to expression — HER2-ST trained on C3, tested on
  C2 and C4 (per-gene PCC over the 250-gene panel and its top-50 variable genes), handcrafted
  with/without stain normalisation vs. a colour/H&E-statistics baseline; and the synthetic
  stack (train section 0, test 1 and 2).

Each measurement runs in a fresh process so the peak RSS (VmHWM) is its own.
Run: `python benchmarks/bench_features.py [--data ../shared/data/her2st] [--out benchmarks/results]`
Writes `OUT/bench_features.md` and prints it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
SECTIONS = ("C2", "C3", "C4")
ENCODER_BATCHES = {"handcrafted": (16, 64), "resnet18": (8, 32, 64), "resnet50": (16, 32), "uni": (8,)}
ENCODER_PATCHES = {"handcrafted": 192, "resnet18": 192, "resnet50": 96, "uni": 16}


# -- measurements, each run in a child process ---------------------------------------------
def _peak_mb() -> float:
    """Peak RSS of this process: VmHWM, which (unlike ru_maxrss) does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _extract(section_path: str, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from stimpute.io import read_section
    from stimpute.patches import iter_patches

    section = read_section(section_path)
    section.image.verify()  # decode once, outside the timing (a JPEG is decoded once anyway)
    t = time.perf_counter()
    n = sum(b.patches.shape[0] * b.patches.shape[1] for b in iter_patches(section, batch_size=batch_size))
    return {"patches": n, "seconds": time.perf_counter() - t, "peak_mb": _peak_mb()}


def _encode(name: str, batch_size: int, n_patches: int, patches_file: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from stimpute.features import load_encoder

    patches = np.load(patches_file)[:n_patches]
    enc = load_encoder(name, random_init=name != "handcrafted")
    enc(patches[:batch_size])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(patches), batch_size):
        enc(patches[i : i + batch_size])
    return {"patches": len(patches), "seconds": time.perf_counter() - t, "peak_mb": _peak_mb()}


def _wsi_extract(tiff: str, n_side: int, pitch: int, um_per_px: float, batch_size: int) -> dict:
    import anndata as ad
    import pandas as pd

    from stimpute.data import Section
    from stimpute.image import SectionImage
    from stimpute.patches import iter_patches, padding_report

    xy = _wsi_spots(n_side, pitch)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    adata.obsm["spatial"] = xy
    section = Section("wsi", adata, SectionImage.open(tiff), um_per_px=um_per_px)
    t = time.perf_counter()
    n = sum(b.patches.shape[0] * b.patches.shape[1] for b in iter_patches(section, batch_size=batch_size))
    return {"spots": len(xy), "patches": n, "seconds": time.perf_counter() - t, "peak_mb": _peak_mb(),
            "padded": padding_report(section)}


def _wsi_spots(n_side: int, pitch: int) -> np.ndarray:
    g = (np.arange(n_side) + 1.0) * pitch
    gx, gy = np.meshgrid(g, g)
    return np.c_[gx.ravel(), gy.ravel()]


# -- parts -----------------------------------------------------------------------------
def part_extract(data: Path, figs: Path) -> list[str]:
    rows = ["## Patch extraction, HER2-ST C3 (all spots × 3 scales → 224 px)", "",
            "| batch size | patches | seconds | patches/s | peak RSS MB |", "|---|---|---|---|---|"]
    for bs in (8, 32, 128):
        r = _in_child(_extract, str(data / "C3"), bs)
        rows.append(f"| {bs} | {r['patches']} | {r['seconds']:.1f} | {r['patches'] / r['seconds']:.0f} | {r['peak_mb']:.0f} |")
    montage = write_montage(data / "C3", figs / "patches_montage_C3.png")
    rows += ["", f"JPEG decoded once before timing (~1 s). Montage: `{montage}`.", ""]
    return rows


def write_montage(section_path: Path, png: Path, n_spots: int = 5) -> Path:
    """A few spots (rows) at the three scales (columns), spot outline drawn at the centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stimpute.io import read_section
    from stimpute.patches import SCALE_NAMES, SCALES_UM, iter_patches

    section = read_section(section_path)
    picks = np.linspace(0, section.n_spots - 1, n_spots).astype(int)
    batch = next(iter_patches(section, batch_size=section.n_spots)).patches[picks]
    fig, axes = plt.subplots(n_spots, 3, figsize=(7.5, 2.5 * n_spots))
    for r, spot in enumerate(picks):
        for s in range(3):
            ax = axes[r, s]
            ax.imshow(batch[r, s])
            radius = section.spot_diameter_um / 2 / SCALES_UM[s] * batch.shape[2]
            ax.add_patch(plt.Circle((111.5, 111.5), radius, fill=False, color="lime", lw=1))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{SCALE_NAMES[s]} ({SCALES_UM[s]:g} µm)", fontsize=9)
        axes[r, 0].set_ylabel(section.spot_ids[spot], fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def part_encoders(data: Path, work: Path) -> list[str]:
    from stimpute.io import read_section
    from stimpute.patches import iter_patches

    patches_file = work / "c3_patches.npy"
    if not patches_file.exists():
        section = read_section(data / "C3")
        p = next(iter_patches(section, batch_size=64)).patches
        np.save(patches_file, p.reshape(-1, *p.shape[2:]))  # 192 patches, the 3 scales mixed
    rows = ["## Encoders at 224 px (2 threads; networks randomly initialised)", "",
            "| encoder | dim | batch size | patches | patches/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    from stimpute.features import ENCODERS

    for name, sizes in ENCODER_BATCHES.items():
        for bs in sizes:
            r = _in_child(_encode, name, bs, ENCODER_PATCHES[name], str(patches_file))
            rows.append(f"| {name} | {ENCODERS[name].dim} | {bs} | {r['patches']} | "
                        f"{r['patches'] / r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    return rows + [""]


def write_synthetic_wsi(path: Path, size: int, tile: int = 512, seed: int = 0) -> Path:
    """A pyramidal, tiled, JPEG-compressed RGB TIFF of H&E-like texture, written tile by tile."""
    import cv2
    import tifffile

    def render(x0: int, y0: int, side: int) -> np.ndarray:
        rng = np.random.default_rng([seed, x0, y0, side])
        img = np.empty((side, side, 3), np.uint8)
        img[:] = (235, 170, 205)
        for cx, cy in rng.integers(0, side, (side * side // 400, 2)):  # nuclei
            cv2.circle(img, (int(cx), int(cy)), int(rng.integers(3, 7)), (80, 45, 125), -1)
        return img

    def tiles(level: int):
        ds = 2**level
        n = -(-size // ds // tile)
        for ty in range(n):
            for tx in range(n):
                full = render(tx * tile * ds, ty * tile * ds, tile * ds)
                yield full if ds == 1 else cv2.resize(full, (tile, tile), interpolation=cv2.INTER_AREA)

    levels = 3
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            side = -(-size // 2**level // tile) * tile
            tif.write(tiles(level), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg", subifds=levels - 1 if level == 0 else None,
                      subfiletype=1 if level else 0)
    return path


def part_wsi(work: Path, n_side: int = 100, pitch: int = 160, um_per_px: float = 0.5) -> list[str]:
    size = (n_side + 1) * pitch
    tiff = work / "synthetic_wsi.tif"
    t = time.perf_counter()
    if not tiff.exists():
        write_synthetic_wsi(tiff, size)
    made = time.perf_counter() - t
    rows = [f"## Synthetic WSI: {n_side * n_side} spots, {size}×{size} px pyramidal TIFF "
            f"({size * size * 3 / 2**30:.2f} GiB as raw RGB, {tiff.stat().st_size / 2**20:.0f} MiB on disk, "
            f"written in {made:.0f} s), {um_per_px} µm/px", "",
            "| batch size | spots | patches | seconds | patches/s | peak RSS MB | padded spots |", "|---|---|---|---|---|---|---|"]
    for bs in (64,):
        r = _in_child(_wsi_extract, str(tiff), n_side, pitch, um_per_px, bs)
        rows.append(f"| {bs} | {r['spots']} | {r['patches']} | {r['seconds']:.0f} | {r['patches'] / r['seconds']:.0f} | "
                    f"{r['peak_mb']:.0f} | {r['padded']} |")
    return rows + [""]


def _cache_run(data: str, cache_dir: str, weights: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from stimpute.features import spot_features
    from stimpute.io import read_section

    out = {}
    for name in SECTIONS:
        runs = []
        t = time.perf_counter()
        section = read_section(Path(data) / name)
        spot_features(section, "resnet18", weights=weights, cache_dir=cache_dir, runs=runs)
        out[name] = (time.perf_counter() - t, runs[-1].cached, runs[-1].n_patches)
    return out


def part_cache(data: Path, work: Path) -> list[str]:
    import shutil

    import torch

    from stimpute.features.resnet import resnet18

    weights = work / "resnet18_random_torchvision.pth"
    torch.manual_seed(0)
    state = resnet18().state_dict()
    torch.save({**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, weights)
    cache_dir = work / "cache_resnet18"
    shutil.rmtree(cache_dir, ignore_errors=True)
    first = _in_child(_cache_run, str(data), str(cache_dir), str(weights))
    second = _in_child(_cache_run, str(data), str(cache_dir), str(weights))
    rows = ["## ResNet-18 features of C2, C3, C4 (random weights in a torchvision-layout file), cache", "",
            "| section | patches | first run s | cached | second run s | cached |", "|---|---|---|---|---|---|"]
    for name in SECTIONS:
        a, b = first[name], second[name]
        rows.append(f"| {name} | {a[2]} | {a[0]:.1f} | {a[1]} | {b[0]:.1f} | {b[1]} |")
    rows.append(f"| total | | {sum(v[0] for v in first.values()):.1f} | | {sum(v[0] for v in second.values()):.1f} | |")
    return rows + ["", "Times include reading each section (counts table ~1 s).", ""]


def _pcc_genes(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y, p = y - y.mean(0), p - p.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (y * p).sum(0) / np.sqrt((y**2).sum(0) * (p**2).sum(0))


def ridge_scores(train_x, train_y, tests: dict, top: np.ndarray) -> dict:
    """Mean per-gene PCC (all panel genes, top variable genes) of a standardised RidgeCV."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 25))).fit(flat(train_x), train_y)
    out = {}
    for name, (x, y) in tests.items():
        r = _pcc_genes(y, model.predict(flat(x)))
        out[name] = (np.nanmean(r), np.nanmean(r[top]))
    return out


def _colour_baseline(section) -> np.ndarray:
    """RGB and rgb2hed mean/sd of the spot patch: the 'colour statistics' baseline."""
    from skimage.color import rgb2hed

    from stimpute.patches import iter_patches

    rows = []
    for batch in iter_patches(section, batch_size=64):
        for p in batch.patches[:, 0]:
            hed, rgb = rgb2hed(p).reshape(-1, 3), p.reshape(-1, 3).astype(float)
            rows.append(np.r_[rgb.mean(0), rgb.std(0), hed.mean(0), hed.std(0)])
    return np.array(rows)[:, None]


def part_ridge(data: Path, work: Path) -> list[str]:
    from stimpute.datasets import synthetic_stack
    from stimpute.expression import panel_expression, select_panel
    from stimpute.features import spot_features
    from stimpute.io import read_section

    sections = {n: read_section(data / n) for n in SECTIONS}
    panel = select_panel([sections["C3"].adata])
    ys = {n: panel_expression(s, panel) for n, s in sections.items()}
    top = np.argsort(-ys["C3"].var(0))[:50]
    cache_dir = work / "cache_handcrafted"
    variants = {
        "colour/H&E statistics (spot, baseline)": {n: _colour_baseline(s) for n, s in sections.items()},
        "handcrafted, 3 scales": {n: spot_features(s, cache_dir=cache_dir) for n, s in sections.items()},
        "handcrafted, 3 scales, Macenko": {n: spot_features(s, cache_dir=cache_dir, stain_normalize=True)
                                           for n, s in sections.items()},
    }
    rows = ["## Ridge, trained on C3, tested on C2 and C4 (mean per-gene PCC)", "",
            f"Panel: {len(panel)} Pearson-residual HVGs of C3 (`select_panel`); top-50 = most variable in C3.", "",
            "| features | C2 (250) | C4 (250) | C2 (top 50) | C4 (top 50) |", "|---|---|---|---|---|"]
    for label, feats in variants.items():
        s = ridge_scores(feats["C3"], ys["C3"], {n: (feats[n], ys[n]) for n in ("C2", "C4")}, top)
        rows.append(f"| {label} | {s['C2'][0]:.3f} | {s['C4'][0]:.3f} | {s['C2'][1]:.3f} | {s['C4'][1]:.3f} |")
    stack = synthetic_stack(3, seed=0)
    genes = list(stack[0].genes)
    feats = [spot_features(s) for s in stack]
    ys = [panel_expression(s, genes) for s in stack]
    top = np.argsort(-ys[0].var(0))[:50]
    s = ridge_scores(feats[0], ys[0], {i: (feats[i], ys[i]) for i in (1, 2)}, top)
    rows += ["", "## Synthetic stack (seed 0): handcrafted → ridge, trained on section 0", "",
             f"| test section | mean PCC ({len(genes)} genes) | top 50 |", "|---|---|---|"]
    rows += [f"| {stack[i].name} | {s[i][0]:.3f} | {s[i][1]:.3f} |" for i in (1, 2)]
    return rows + [""]


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(paths: list[str], runs: int) -> dict:
    """`spot_features` (handcrafted, no cache) of the sections at `paths`, best of `runs`:
    wall seconds, CPU seconds of this process and of the worker processes, patches."""
    from stimpute.features import handcrafted, spot_features
    from stimpute.io import read_section

    sections = [read_section(p) for p in paths]
    workers = list(handcrafted.worker_pool(os.cpu_count() or 1)._processes)
    best = None
    for _ in range(runs):
        for s in sections:
            s.image.release()  # every run decodes its image (flat JPEG) or tiles (pyramid) anew
        w0, c0, t0 = sum(map(_proc_cpu, workers)), time.process_time(), time.perf_counter()
        n = sum(np.prod(spot_features(s).shape[:2]) for s in sections)
        run = {"seconds": time.perf_counter() - t0, "parent_cpu": time.process_time() - c0,
               "worker_cpu": sum(map(_proc_cpu, workers)) - w0, "patches": int(n), "load": os.getloadavg()[0]}
        best = run if best is None or run["seconds"] < best["seconds"] else best
    return best


def _descriptor_parts(paths: list[str], n: int = 192, runs: int = 3) -> dict:
    """CPU ms per patch of reading (incl. resampling) and of each descriptor part, in one
    process, on the first `n` patches of the sections (best of `runs`)."""
    import cv2

    from stimpute.features import handcrafted as hc
    from stimpute.io import read_section
    from stimpute.patches import iter_patches

    def cpu_ms(fn, items) -> float:
        best = np.inf
        for _ in range(runs):
            t = time.process_time()
            for item in items:
                fn(item)
            best = min(best, time.process_time() - t)
        return best / len(items) * 1e3

    section = read_section(paths[0])
    batch = lambda: next(iter_patches(section, batch_size=max(1, n // 3), raster_order=True)).patches  # noqa: E731
    patches = batch().reshape(-1, *batch().shape[2:])  # (the first read decodes: the image or its tiles)
    read = cpu_ms(lambda _: batch(), [0]) / len(patches)
    pre = []
    for p in patches:
        gray = cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)
        od = cv2.LUT(p, hc._OD_LUT3)
        pre.append((p, gray, gray < hc.TISSUE_MAX_GRAY, od))
    parts = {"read + resample (decoded image)": read, "all descriptors": cpu_ms(hc.describe_patch, patches),
             "grey, OD": cpu_ms(lambda p: cv2.LUT(p, hc._OD_LUT3) + cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)[..., None], patches),
             "colour": cpu_ms(lambda x: hc._colour(x[0], x[3], x[2]), pre),
             "nuclei": cpu_ms(lambda x: hc._nuclei(hc._unmix(x[3], 1), x[2]), pre),
             "glcm": cpu_ms(lambda x: hc._glcm(x[1]), pre), "lbp": cpu_ms(lambda x: hc._lbp(x[1]), pre),
             "dog": cpu_ms(lambda x: hc._dog(x[1]), pre)}
    return parts


def visium_section(work: Path, spots: int) -> Path:
    """The synthetic Visium section (1 × `spots`, `write_visium_block`), written once under `work`."""
    from stimpute.datasets import write_visium_block

    block = work / f"visium_1x{spots}"
    st = sorted((block / "st").glob("*.h5ad")) if (block / "st").is_dir() else []
    return Path(st[0] if st else write_visium_block(block, n_sections=1, spots_per_section=spots, seed=0).sections[0])


def part_throughput(data: Path, work: Path, spots: int = 4000, runs: int = 3) -> list[str]:
    inputs = {f"synthetic Visium, 1 section × {spots} spots (pyramidal JPEG TIFF, 0.5 µm/px)": [str(visium_section(work, spots))],
              "HER2-ST C2 + C3 + C4 (flat JPEGs, 0.686 µm/px; each decoded in the run)": [str(data / s) for s in SECTIONS]}
    rows = [f"## Handcrafted feature extraction end to end (issue 16): `spot_features`, all spots × 3 scales, "
            f"{os.cpu_count()} cores, best of {runs}", "",
            "| input | patches | seconds | patches/s | CPU ms/patch: reading process | workers | total | load average |",
            "|---|---|---|---|---|---|---|---|"]
    parts = {}
    for label, paths in inputs.items():
        r = _throughput(paths, runs)  # in this process (its worker pool is reused): nothing here reads peak RSS
        n = r["patches"]
        rows.append(f"| {label} | {n} | {r['seconds']:.1f} | {n / r['seconds']:.0f} | {r['parent_cpu'] / n * 1e3:.2f} | "
                    f"{r['worker_cpu'] / n * 1e3:.2f} | {(r['parent_cpu'] + r['worker_cpu']) / n * 1e3:.2f} | {r['load']:.1f} |")
        parts[label.split(",")[0].split(" (")[0]] = _descriptor_parts(paths)
    names = list(next(iter(parts.values())))
    rows += ["", "CPU ms per 224 px patch, one process, 192 patches (best of 3):", "",
             "| input | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows += [f"| {label} | " + " | ".join(f"{v:.2f}" for v in p.values()) + " |" for label, p in parts.items()]
    return rows + ["", "The machine is shared: CPU ms per patch are steadier than wall time under load "
                       "(2 cores ÷ total CPU ms = the rate on an idle machine).", ""]


_FEATURES_RUN = """
import json, sys
import numpy as np
from stimpute.features import spot_features
from stimpute.io import read_section
sections = [read_section(p) for p in sys.argv[2:]]
n = sum(int(np.prod(spot_features(s).shape[:2])) for s in sections) if sys.argv[1] == "features" else 0
print(json.dumps({"patches": n}))
"""


def _features_process(src: Path, mode: str, paths: list[str]) -> dict:
    """One fresh process with `src` first on PYTHONPATH: import the features and read the
    sections (`mode` "read"), and compute their handcrafted features too ("features"; no
    cache). Wall and CPU seconds (`wait4`: the process and the workers it reaped), patches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _FEATURES_RUN, mode, *paths], stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"features run with {src} failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime,
            **json.loads(stdout.strip().splitlines()[-1])}


def part_against(baseline: str, paths: list[str], work: Path, reps: int = 2) -> list[str]:
    """The handcrafted features of `paths` on this tree and on `baseline` (a git ref, checked
    out under WORK/ref-tree, or a tree's folder), interleaved, `reps` repetitions with the order
    swapped each time: CPU ms per patch = CPU of a process that computes them minus CPU of one
    that only imports and reads the sections (each a fresh process, no cache)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_speed import ref_tree

    trees = {"this": ROOT / "src"}
    trees[baseline] = Path(baseline) / "src" if Path(baseline, "src").is_dir() else ref_tree(baseline, work / "ref-tree") / "src"
    runs = {name: [] for name in trees}
    for rep in range(reps):
        for name in list(trees)[::1 if rep % 2 == 0 else -1]:
            read = _features_process(trees[name], "read", paths)
            full = _features_process(trees[name], "features", paths)
            runs[name].append({"cpu_ms": (full["cpu"] - read["cpu"]) / full["patches"] * 1e3,
                               "rate": full["patches"] / max(full["wall"] - read["wall"], 1e-9),
                               "patches": full["patches"], "load": os.getloadavg()[0]})
            print(f"[against: {name} rep {rep + 1}: {runs[name][-1]}]", flush=True)
    this, ref = runs["this"], runs[baseline]
    ratio = [r["cpu_ms"] / t["cpu_ms"] for t, r in zip(this, ref)]
    rate = [t["rate"] / r["rate"] for t, r in zip(this, ref)]
    rows = [f"## Handcrafted features against {baseline} (interleaved, {reps} repetitions, no cache)", "",
            f"Sections: {', '.join(paths)} ({this[0]['patches']} patches). CPU: `wait4` of a fresh process that computes "
            "the features (and of the workers it reaped) minus that of one that only imports and reads the sections; "
            f"load average {min(r['load'] for r in this + ref):.1f}-{max(r['load'] for r in this + ref):.1f}.", "",
            "| tree | CPU ms / patch | patches/s (wall) |", "|---|---|---|"]
    for name in trees:
        cpu, rates = (", ".join(f"{r[key]:{fmt}}" for r in runs[name]) for key, fmt in (("cpu_ms", ".2f"), ("rate", ".0f")))
        rows.append(f"| {name} | {cpu} | {rates} |")
    rows += [f"| ratio (paired by repetition) | **{min(ratio):.2f}-{max(ratio):.2f} ×** | {min(rate):.2f}-{max(rate):.2f} × |", ""]
    return rows


PARTS = {"extract": part_extract, "encoders": part_encoders, "wsi": part_wsi, "cache": part_cache, "ridge": part_ridge,
         "throughput": part_throughput, "against": part_against}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--figs", type=Path, default=None, help="where the montage PNG goes (default: OUT)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--spots", type=int, default=4000, help="throughput: spots of the synthetic Visium section")
    ap.add_argument("--runs", type=int, default=3, help="throughput: runs, the fastest reported")
    ap.add_argument("--baseline", default="9be9671", help="against: a git ref (checked out under OUT/features_work/ref-tree) or a tree's folder")
    ap.add_argument("--sections", nargs="+", default=None,
                    help="against: the sections (default: the synthetic Visium section of the throughput part)")
    ap.add_argument("--reps", type=int, default=2, help="against: repetitions of each tree, the order swapped each time")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = args.out / "features_work"
    work.mkdir(parents=True, exist_ok=True)
    lines = ["# Features benchmark (issue 4)", "", f"{os.cpu_count()} CPU cores visible; torch threads 2.", ""]
    for part in args.parts.split(","):
        t = time.perf_counter()
        if part == "extract":
            lines += part_extract(args.data, args.figs or args.out)
        elif part in ("wsi",):
            lines += PARTS[part](work)
        elif part == "throughput":
            lines += part_throughput(args.data, work, args.spots, args.runs)
        elif part == "against":
            lines += part_against(args.baseline, args.sections or [str(visium_section(work, args.spots))], work, args.reps)
        else:
            lines += PARTS[part](args.data, work)
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
    text = "\n".join(lines) + "\n"
    (args.out / "bench_features.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
