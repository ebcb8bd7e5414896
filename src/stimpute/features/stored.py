"""Features a section brings with it: used as given, named by their encoder, never mixed.

A section carries stored per-spot features in `adata.obsm["<encoder>_features"]`, shape
(n_spots, dim), where `<encoder>` is a registered encoder name: a 3DMoEST H5 file's
`uni_features` arrive this way (`stimpute.io.moest_h5`), as does any `.h5ad` or section
folder holding e.g. `obsm["uni_features"]` or `obsm["handcrafted_features"]`.

`stack_features` gives every section of a stack its features, in one feature space:
- no section carries stored features: each is encoded from its image (`spot_features`,
  three scales), with `encoder` (default `handcrafted`);
- some do: they are used as given and recorded as `"<encoder> (stored)"`. `encoder`, if
  named, must be the stored one; sections without stored features are encoded with that
  encoder (a network needs its `--weights`); stored features of two encoders in one
  stack are an error. Stored features have one scale (the spot) while the models read
  (n_spots, n_scales, dim): the spot features are repeated over the scales, for every
  section of such a stack (computed ones keep only their spot scale too), so the context
  scales carry no extra information rather than a different feature space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stimpute.data import Section, Stack
from stimpute.errors import StimputeError
from stimpute.features import spot_features
from stimpute.features.checkpoint import check_weights
from stimpute.features.encoders import ENCODERS, base_encoder, encoder_record, get_spec, resolve_weights, stored_label
from stimpute.patches import SCALES_UM

SUFFIX = "_features"
DEFAULT_ENCODER = "handcrafted"


def stored_key(encoder: str) -> str:
    """The obsm key (and 3DMoEST H5 dataset name) of `encoder`'s stored features."""
    return f"{encoder}{SUFFIX}"


def is_stored_key(key: str) -> bool:
    """True for `<encoder>_features` of a registered encoder."""
    return key.endswith(SUFFIX) and key[: -len(SUFFIX)] in ENCODERS


def stored_features(section: Section) -> tuple[str, np.ndarray] | None:
    """(encoder, (n_spots, dim) float32) of the features `section` carries, or None."""
    keys = [k for k in section.adata.obsm if is_stored_key(k)]
    where = section.source or section.name
    if len(keys) > 1:
        raise StimputeError(where, f"carries stored features of several encoders ({', '.join(keys)}): keep one")
    if not keys:
        return None
    value = np.asarray(section.adata.obsm[keys[0]], np.float32)
    if value.ndim != 2 or len(value) != section.n_spots:
        raise StimputeError(where, f"obsm['{keys[0]}'] has shape {value.shape}, expected ({section.n_spots} spots, dim)")
    if not np.isfinite(value).all():
        raise StimputeError(where, f"obsm['{keys[0]}'] contains missing or infinite values")
    return keys[0][: -len(SUFFIX)], value


def check_encoder(encoder: str | None, weights: str | Path | None) -> None:
    """Fail fast on an unknown encoder, a missing optional extra, or a bad weight file
    (missing, unreadable, or of another architecture), before any section is read (a
    network's missing `--weights` are only an error once features must be computed)."""
    if encoder is None:
        if weights is not None:
            raise StimputeError("--weights", "given without --encoder: name the network the weights are for")
        return
    spec = get_spec(encoder)
    weights = resolve_weights(spec, weights)
    if weights is not None or not spec.needs_weights:
        encoder_record(encoder, weights)  # also refuses weights for handcrafted and a missing file
    if weights is not None:
        check_weights(weights, spec.build, spec.name)


def stored_encoder(stack: Stack, encoder: str | None = None) -> str:
    """The encoder of `stack`'s features: the stored one, checked against `encoder` and
    against the other sections' (one feature space per stack), else `encoder` or the default.
    Cheap: call it before anything slow to fail fast."""
    stored = _stored(stack)
    kinds = {enc: i for i, (enc, _) in stored.items()}
    if len(kinds) > 1:
        (a, i), (b, j) = list(kinds.items())[:2]
        raise StimputeError(stack[j].source or stack[j].name,
                            f"carries stored {b} features but {stack[i].name} carries {a} features: "
                            "one stack needs one feature space")
    if not kinds:
        return encoder or DEFAULT_ENCODER
    name, first = next(iter(kinds.items()))
    if encoder is not None and encoder != name:
        s = stack[first]
        raise StimputeError(s.source or s.name, f"carries stored {name} features (obsm['{stored_key(name)}']), not "
                            f"--encoder {encoder}: leave --encoder out (or pass --encoder {name}) to use them")
    return name


def stack_features(stack: Stack, encoder: str | None = None, weights: str | Path | None = None,
                   cache_dir: str | Path | None = None, progress: bool = False,
                   n_scales: int = len(SCALES_UM), hardware: dict | None = None) -> tuple[list[np.ndarray], dict]:
    """Features (n_i, n_scales, dim) of every section and their record (see module doc):
    `encoder` (as recorded), `weights`, `weights_sha256`, and for stored features
    `stored_sections` and `scales`. `hardware`: Lightning's flags of the processes that
    share the encoding (`spot_features`)."""
    name, stored = stored_encoder(stack, encoder), _stored(stack)
    if not stored:
        feats = []
        for s in stack:  # one section's image open at a time: memory does not grow with the stack
            feats.append(spot_features(s, encoder=name, weights=weights, cache_dir=cache_dir, progress=progress, hardware=hardware))
            s.image.release()
        return feats, encoder_record(name, weights)
    feats = []
    for i, s in enumerate(stack):
        if i in stored:
            spot = stored[i][1]
        else:  # the same encoder, computed; only its spot scale, like the stored ones
            spot = spot_features(s, encoder=name, weights=weights, cache_dir=cache_dir, progress=progress, hardware=hardware)[:, 0]
            s.image.release()
        feats.append(repeat_scales(spot, n_scales))
    computed = [s.name for i, s in enumerate(stack) if i not in stored]
    record = encoder_record(name, weights) if computed else {"encoder": name, "weights": None, "weights_sha256": None}
    return feats, {**record, "encoder": stored_label(name), "stored_sections": [stack[i].name for i in stored],
                   "scales": f"spot features repeated over {n_scales} scales (stored features have one scale)"}


def _stored(stack: Stack) -> dict[int, tuple[str, np.ndarray]]:
    return {i: found for i, s in enumerate(stack) if (found := stored_features(s)) is not None}


def repeat_scales(spot: np.ndarray, n_scales: int = len(SCALES_UM)) -> np.ndarray:
    """(n, dim) spot features as (n, n_scales, dim): the one stored scale stands for all."""
    spot = np.asarray(spot, np.float32)
    return np.ascontiguousarray(np.broadcast_to(spot[:, None, :], (len(spot), n_scales, spot.shape[1])))


def check_trained_on(trained: str, section: Section, model: str | Path) -> None:
    """A model trained on `trained` features ("uni (stored)", "handcrafted") predicts a
    section only from the same kind: stored features of that encoder, or computed ones."""
    found = stored_features(section)
    label = stored_label(found[0]) if found else base_encoder(trained)[0]
    if label != trained:
        raise StimputeError(section.source or section.name, f"gives {label} features, but the model {model} was trained on "
                            f"{trained} features: feature spaces are never mixed")
