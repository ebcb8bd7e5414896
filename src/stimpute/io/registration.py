"""What `stimpute register` writes: transforms, registered spots, matches, graph and QC figures.

Every file is written under a temporary name and renamed, so an interrupted run never
leaves a half-written file; an existing result folder is only replaced with `force`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from stimpute import __version__
from stimpute.data import Stack
from stimpute.errors import StimputeError
from stimpute.files import atomic_write
from stimpute.register import StackRegistration, register_stack, section_view
from stimpute.register.grid import GridOptions, place_virtual_spots
from stimpute.register.figures import save_pair_overlay, save_spot_cloud
from stimpute.register.matching import match_stack, matched_fraction

FIGURE_SIDE = 768  # px of the largest image's side in the overlay figures
OUTPUT_NAMES = ("transforms.json", "spots.csv", "matches.csv", "graph.pt", "figures")


def registered_spots(stack: Stack, reg: StackRegistration) -> pd.DataFrame:
    """Table section, spot, x, y: every spot in pixels of the first section's image."""
    return pd.concat(
        [pd.DataFrame({"section": s.name, "spot": s.spot_ids, "x": xy[:, 0], "y": xy[:, 1]}) for s, xy in zip(stack, reg.coords_ref)],
        ignore_index=True,
    )


def write_registration(stack: Stack, out: str | Path, force: bool = False, progress: bool = False,
                       grid: GridOptions | None = None) -> dict:
    """Register `stack` and write OUTPUT_NAMES into `out`; returns a summary for reports.

    H&E-only sections (no spots) get virtual spots (`grid`): the spot grid of the first
    section with spots, else a Visium grid (`stimpute.register.grid`)."""
    from stimpute.graph import build_graph, save_graph

    out = Path(out)
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not force:
        raise StimputeError(out, f"already holds registration results ({', '.join(existing)}); pass --force to overwrite")
    if any(s.n_spots == 0 for s in stack):
        anchor = [i for i, s in enumerate(stack) if s.n_spots][:1]
        reg = place_virtual_spots(stack, anchor, grid, progress=progress, default_grid=True)
    else:
        reg = register_stack(stack, progress=progress)
    matches = match_stack(stack, reg.coords_ref)
    graph = build_graph(stack, reg.coords_ref)
    fractions = matched_fraction(stack, matches)

    record = {**reg.to_json(), "matched_fraction": fractions, "stimpute_version": __version__,
              "inputs": [s.source or s.name for s in stack]}
    atomic_write(out / "transforms.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    atomic_write(out / "spots.csv", lambda tmp: registered_spots(stack, reg).to_csv(tmp, index=False))
    atomic_write(out / "matches.csv", lambda tmp: matches.to_csv(tmp, index=False))
    save_graph(graph, out / "graph.pt")
    figures = write_figures(stack, reg, out / "figures")
    return {"registration": reg, "matches": matches, "matched_fraction": fractions, "figures": figures,
            "n_edges": int(graph.edge_index.shape[1])}


def figure_names(stack: Stack) -> list[str]:
    """File names `write_figures` writes for `stack`."""
    return [f"overlay_{a.name}_{b.name}.png" for a, b in zip(stack.sections, stack.sections[1:])] + ["spots_3d.png"]


def write_figures(stack: Stack, reg: StackRegistration, folder: Path) -> list[Path]:
    """Before/after overlay of each adjacent pair and the 3D spot cloud (the cloud only for a
    registration the sections brought with them: no image was compared, they may be blank)."""
    compared = len(reg.pairs) > 0
    extent_um = max(max(s.image.size) * s.um_per_px for s in stack)
    views = [section_view(s, extent_um / FIGURE_SIDE) for s in stack] if compared else []
    paths = []
    for i in range(1, len(stack) if compared else 1):
        fixed, moving = stack[i - 1], stack[i]
        before = np.diag([moving.um_per_px / fixed.um_per_px] * 2 + [1.0])
        after = np.linalg.inv(reg.transforms[i - 1]) @ reg.transforms[i]
        path = folder / figure_names(stack)[i - 1]
        paths.append(save_pair_overlay(views[i - 1], views[i], before, after, f"{moving.name} onto {fixed.name}", path))
    paths.append(save_spot_cloud(stack, reg.coords_ref, folder / "spots_3d.png"))
    return paths
