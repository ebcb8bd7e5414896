"""The `stimpute` command line: a thin typer layer over the Python API.

Every command catches `StimputeError` and prints it as one line naming the file and the
problem, with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from stimpute.defaults import DEFAULT_FUSION, DEFAULT_PANEL_SIZE
from stimpute.distributed import is_rank_zero, launch
from stimpute.errors import StimputeError, StimputeWarning, check_text_path
from stimpute.files import refuse_if_held

def flag(*names: str, **options):
    """A boolean option (`--x/--no-x`), listed in --help without a `<bool>` value column: it takes none."""
    return typer.Option(*names, metavar="", **options)


app = typer.Typer(
    name="stimpute",
    help="3D spatial transcriptomics from serial H&E sections: read, align, impute, evaluate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
convert_app = typer.Typer(help="Turn a source format into the project's section folders.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

UNWRAPPED_WIDTH = 10_000  # columns of a console writing to a file or pipe: tables at full width, lines unbroken


class FileConsole(Console):
    """A rich console that, writing to a file or a pipe, neither truncates tables nor
    breaks lines: rich would lay them out in 80 columns (or $COLUMNS) there, cutting
    table cells ("meth…") and paths. On a terminal it is rich's own."""

    def _unwrapped_size(self):
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    size = property(_unwrapped_size, Console.size.fset)


console = FileConsole()
err_console = FileConsole(stderr=True)

Sections = Annotated[
    list[Path],
    typer.Argument(help="Sections in stack order: HER2-ST raw folders, section folders, .h5ad files or Space Ranger outs/ folders (measured sections: not H&E images alone)."),
]
ImageSections = Annotated[
    list[Path],
    typer.Argument(help="Sections in stack order: HER2-ST raw folders, section folders, .h5ad files, Space Ranger outs/ folders, or H&E images alone (JPEG, PNG, TIFF, WSI; scale: --um-per-px)."),
]
UmPerPxOption = Annotated[Optional[float], typer.Option("--um-per-px", help="Micrometres per pixel of the H&E-only sections (image files; default: their metadata, else the measured sections').")]


def _version(value: bool) -> None:
    if value:
        from stimpute import __version__

        console.print(f"stimpute {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, flag("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False,
):  # options before the command name; the help text is the app's
    pass
EncoderOption = Annotated[str, typer.Option(help="Feature encoder: handcrafted (offline default), efficientnet_lite0 (ImageNet weights from its optional extra), resnet18, resnet50, uni or ciga (these need --weights).")]
StackEncoderOption = Annotated[Optional[str], typer.Option("--encoder", help="Feature encoder: handcrafted, efficientnet_lite0 (ImageNet weights from its optional extra), resnet18, resnet50, uni or ciga (these need --weights); default: the features the sections carry (e.g. a 3DMoEST file's uni_features), else handcrafted.")]
WeightsOption = Annotated[Optional[Path], typer.Option(help="Local weight file of a network encoder (never downloaded; overrides efficientnet_lite0's installed weights): torchvision, timm or Lightning layout.")]
DeviceOption = Annotated[str, typer.Option(help="Where models train and network encoders run: auto (a CUDA GPU when there is one, else the CPU), cpu or cuda (Lightning's accelerator; CPU training is deterministic).")]
DevicesOption = Annotated[str, typer.Option("--devices", help="Lightning's devices: GPUs (or CPU processes) per machine that work together: a count, -1 for all, auto, or GPU ids like 0,2. More than one shares the feature extraction and trains data-parallel (DDP); only rank 0 writes to OUT.")]
NumNodesOption = Annotated[int, typer.Option("--num-nodes", help="Lightning's num_nodes: machines that work together; start the same command on each (README: several GPUs and machines).")]
StrategyOption = Annotated[str, typer.Option("--strategy", help="Lightning's strategy: auto, ddp (one process per device), ddp_spawn, fsdp, ...")]
BatchNodesOption = Annotated[Optional[int], typer.Option("--batch-nodes", help="Most graph nodes in one training or inference batch of MSAGNet, neighbours included (default 20,000): bounds memory; a larger graph trains on the labelled spots' neighbourhood, or in mini-batches.")]


def guarded(command):
    """Turn user errors into clear lines on stderr (one per problem) and exit code 2;
    print stimpute's warnings (input it fixed) as one line each. The command's
    `--devices/--num-nodes` say whether rank variables of the environment count (`launch`);
    a path argument that is not UTF-8 is refused before any work (`check_text_path`), and so
    is an `--out` that a live run holds (`refuse_if_held`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(), launch(kwargs.get("devices", 1), kwargs.get("num_nodes", 1)):
            warnings.simplefilter("always", StimputeWarning)
            warnings.showwarning = _show_warning
            console.quiet = not is_rank_zero()  # several training processes: rank 0 alone reports
            try:
                for value in kwargs.values():  # every path the command reads or writes, before any work
                    for path in value if isinstance(value, list) else [value]:
                        if isinstance(path, Path):
                            check_text_path(path)
                if isinstance(kwargs.get("out"), Path) and is_rank_zero():  # a busy --out is refused before the heavy imports
                    refuse_if_held(kwargs["out"])  # (not on the other ranks of a run: rank 0 holds it, they write elsewhere)
                return command(*args, **kwargs)
            except StimputeError as exc:
                for line in exc.lines():
                    err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

    return wrapper


def _show_warning(message, category, *_args, **_kwargs):
    if issubclass(category, StimputeWarning):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@app.command()
@guarded
def info(
    sections: ImageSections,
    verify: Annotated[bool, flag(help="Decode each image fully to catch truncated files.")] = True,
    um_per_px: UmPerPxOption = None,
):
    """Summarise sections: spots kept/dropped, genes, image size, µm/px, counts.

    Example: [bold]stimpute info ../shared/data/her2st/C2 ../shared/data/her2st/C3[/]
    """
    from stimpute.io import read_sections

    loaded = []
    for path in sections:
        for section in read_sections(path, um_per_px=um_per_px):
            if verify:
                section.image.verify()
                section.image.release()
            loaded.append(section)
    console.print(sections_table(loaded))


def sections_table(sections) -> Table:
    """One row per section: what was read, what was dropped, and the geometry."""
    table = Table(title="sections")
    for col in ("section", "spots kept", "spots dropped", "genes", "image px", "µm/px", "spot Ø px", "counts"):
        table.add_column(col, no_wrap=col in ("section", "image px"))
    for section in sections:
        rep = section.report
        dropped = rep.get("dropped_spots_without_counts", 0) + rep.get("dropped_zero_count_spots", 0)
        extra = rep.get("dropped_counts_without_spot", 0)
        W, H = section.image.size
        table.add_row(
            section.name,
            str(section.n_spots),
            f"{dropped} (+{extra} counts rows)" if extra else str(dropped),
            _genes(section),
            f"{W}×{H}",
            f"{section.um_per_px:.4g}",
            f"{section.spot_diameter_px:.0f}",
            "yes" if section.has_counts or rep.get("measured") else "no",
        )
    return table


def _genes(section) -> str:
    """The genes column: a result's panel, measured or imputed; else the section's genes."""
    if "imputed_genes" not in section.report:
        return str(section.adata.n_vars)
    return f"{section.report['imputed_genes']} {'measured' if section.report.get('measured') else 'imputed'}"


@convert_app.command("her2st")
@guarded
def convert_her2st(
    src: Annotated[Path, typer.Argument(help="A HER2-ST section folder, or a folder of them (e.g. her2st/ with C2, C3, ...).")],
    out: Annotated[Path, typer.Argument(help="Output folder; one section folder per section is written in it.")],
    force: Annotated[bool, flag(help="Overwrite existing section folders.")] = False,
):
    """Convert HER2-ST raw folders (counts .tsv.gz + _selection.tsv + JPEG) to section folders.

    Example: [bold]stimpute convert her2st ../shared/data/her2st sections/[/]
    """
    from stimpute.io import read_her2st, write_section
    from stimpute.io.her2st import is_her2st_folder

    from stimpute.files import run_ownership

    folders = [src] if is_her2st_folder(src) else sorted(p for p in src.glob("*") if is_her2st_folder(p))
    if not folders:
        raise StimputeError(src, "no HER2-ST section folder (with a *_selection.tsv) found")
    with run_ownership(out, "convert", [src], force) as run:
        for folder in folders:
            section = read_her2st(folder)
            target = write_section(section, out, force=run.claim([f"{section.name}/"]))
            console.print(f"{section.name}: {section.n_spots} spots, {section.adata.n_vars} genes → {target}")


@convert_app.command("h5ad")
@guarded
def convert_h5ad(
    h5ad: Annotated[Path, typer.Argument(help='An .h5ad with obsm["spatial"] (HEST-1k style).')],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    image: Annotated[Optional[Path], typer.Option(help="The section's H&E image (default: found beside the file or in ../wsis/).")] = None,
    um_per_px: Annotated[Optional[float], typer.Option(help="Micrometres per full-resolution pixel (default: from the file's metadata).")] = None,
    force: Annotated[bool, flag(help="Overwrite an existing section folder.")] = False,
    spot_diameter_um: Annotated[Optional[float], typer.Option(help="Spot diameter in µm (default: from the file's metadata, else Visium's 55 with a warning).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Spot centre-to-centre distance in µm (default: from the file's metadata, else estimated from the spots).")] = None,
):
    """Convert an .h5ad + image (e.g. a HEST-1k sample) to a section folder.

    Example: [bold]stimpute convert h5ad hest/st/TENX95.h5ad sections/ --image hest/wsis/TENX95.tif[/]
    """
    from stimpute.io import read_h5ad_section
    from stimpute.register.grid import GridOptions

    GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um)  # refuses values that are not positive
    _convert_one(out, [h5ad, image], force, lambda: read_h5ad_section(
        h5ad, image=image, um_per_px=um_per_px, spot_diameter_um=spot_diameter_um, pitch_um=pitch_um))


def _convert_one(out: Path, inputs: list, force: bool, read) -> None:
    """Write the section that `read()` returns as a section folder in `out`, a run of
    `convert` owning `out`, and say so."""
    from stimpute.io import write_section
    from stimpute.files import run_ownership

    with run_ownership(out, "convert", inputs, force) as run:
        section = read()
        target = write_section(section, out, force=run.claim([f"{section.name}/"]))
    console.print(f"{section.name}: {section.n_spots} spots, {section.adata.n_vars} genes → {target}", highlight=False)


@convert_app.command("spaceranger")
@guarded
def convert_spaceranger(
    outs: Annotated[Path, typer.Argument(help="A Space Ranger outs/ folder (filtered_feature_bc_matrix.h5 + spatial/), or the run folder holding it.")],
    out: Annotated[Path, typer.Argument(help="Output folder; the section folder <name>/ is written in it (name: the folder above outs/).")],
    image: Annotated[Optional[Path], typer.Option(help="The full-resolution H&E image Space Ranger was run on (its --image); default: the one image in outs/, else spatial/tissue_hires_image.png.")] = None,
    um_per_px: Annotated[Optional[float], typer.Option(help="Micrometres per full-resolution pixel (default: from the 55 µm spot in scalefactors_json.json).")] = None,
    force: Annotated[bool, flag(help="Overwrite an existing section folder.")] = False,
):
    """Convert a Space Ranger outs/ folder (Visium v1, v2, CytAssist) + its full-resolution image to a section folder.

    An outs/ folder is also read directly wherever a SECTION is taken; this command names the image explicitly.
    Example: [bold]stimpute convert spaceranger runs/A1/outs sections/ --image scans/A1.tif[/]
    """
    from stimpute.io import read_spaceranger

    _convert_one(out, [outs, image], force, lambda: read_spaceranger(outs, image=image, um_per_px=um_per_px))


@convert_app.command("moest-h5")
@guarded
def convert_moest_h5(
    h5: Annotated[Path, typer.Argument(help="A 3DMoEST H5 file: one group per section (uni_features, coords_3d, sobel_gradients, expression, patches) + gene_names.")],
    out: Annotated[Path, typer.Argument(help="Output folder; one section folder per group is written in it.")],
    um_per_px: Annotated[Optional[float], typer.Option(help="Pixel size of the image rebuilt from the stored patches (default: at most 3000 px a side).")] = None,
    force: Annotated[bool, flag(help="Overwrite existing section folders.")] = False,
):
    """Convert a 3DMoEST H5 file to section folders (spots in the file's shared µm frame).

    Example: [bold]stimpute convert moest-h5 her2st_3d.h5 sections/[/]
    """
    from stimpute.io import write_section
    from stimpute.io.moest_h5 import moest_to_stack, read_moest_h5
    from stimpute.files import run_ownership

    with run_ownership(out, "convert", [h5], force) as run:
        for section in moest_to_stack(read_moest_h5(h5), source=h5, um_per_px=um_per_px):
            target = write_section(section, out, force=run.claim([f"{section.name}/"]))
            console.print(f"{section.name}: {section.n_spots} spots, {section.adata.n_vars} genes → {target}", highlight=False)


@convert_app.command("to-moest-h5")
@guarded
def convert_to_moest_h5(
    sections: Sections,
    out: Annotated[Path, typer.Option(help="The 3DMoEST H5 file to write.")],
    encoder: Annotated[Optional[str], typer.Option(help="Feature encoder, written as <encoder>_features: uni (with --weights) gives 3DMoEST's uni_features; handcrafted, resnet18, ...; default: the features the sections carry, else handcrafted.")] = None,
    weights: WeightsOption = None,
    genes: Annotated[Optional[Path], typer.Option(help="Genes whose counts are written (default: top 250 HVGs of the measured sections).")] = None,
    thickness_um: Annotated[Optional[float], typer.Option(help="Section spacing for coords_3d z = index × thickness.")] = None,
    patches: Annotated[bool, flag(help="Also store the 224 px spot patches.")] = False,
    force: Annotated[bool, flag(help="Overwrite an existing file.")] = False,
):
    """Write sections (in stack order) as one 3DMoEST H5 file (registered coords_3d, features, Sobel maps, counts).

    Example: [bold]stimpute convert to-moest-h5 ../shared/data/her2st/C2 ../shared/data/her2st/C3 --out her2st_3d.h5[/]
    """
    from stimpute.features.stored import check_encoder
    from stimpute.io import read_stack
    from stimpute.io.moest_h5 import prepared_to_moest, write_moest_h5
    from stimpute.prepare import prepare_stack

    from stimpute.io.image_section import refuse_images
    from stimpute.files import check_inputs

    refuse_images(sections, "convert to-moest-h5")
    check_inputs(out, [*sections, genes, weights])
    if out.exists() and not force:
        raise StimputeError(out, "already exists; pass --force to overwrite")
    check_encoder(encoder, weights)
    stack = read_stack(sections) if thickness_um is None else read_stack(sections, thickness_um=thickness_um)
    prepared = prepare_stack(stack, panel=genes, encoder=encoder, weights=weights, progress=True, feature_norm="none")
    data = prepared_to_moest(prepared, thickness_um=thickness_um, with_patches=patches)
    write_moest_h5(data, out, force=force)
    console.print(f"wrote {len(data.sections)} sections × {len(data.gene_names)} genes to {out}", highlight=False)


@app.command()
@guarded
def panel(
    sections: Sections,
    genes: Annotated[Optional[Path], typer.Option(help="A gene list file, one symbol per line, checked against the data.")] = None,
    n_top: Annotated[int, typer.Option(help="Panel size when no --genes: top highly variable genes.")] = DEFAULT_PANEL_SIZE,
    rule: Annotated[str, typer.Option(help="hvg (Pearson-residual HVGs) or mean (ASIGN reference: highest mean).")] = "hvg",
    out: Annotated[Optional[Path], typer.Option(help="Write the panel here, one gene per line.")] = None,
):
    """Select the gene panel from the measured sections and print it.

    Example: [bold]stimpute panel ../shared/data/her2st/C3 --n-top 250 --out panel.txt[/]
    """
    from stimpute.expression import select_panel
    from stimpute.io import read_section
    from stimpute.files import write_text_atomic
    from stimpute.io.image_section import refuse_images
    from stimpute.files import check_inputs

    refuse_images(sections, "panel")
    if out is not None:
        check_inputs(out, [*sections, genes])
    chosen = select_panel([read_section(p).adata for p in sections], n_top=n_top, genes=genes, rule=rule)
    if out is not None:
        write_text_atomic(out, "\n".join(chosen) + "\n")
    console.print(f"{len(chosen)} genes: {', '.join(chosen)}", highlight=False)


@app.command()
@guarded
def register(
    sections: ImageSections,
    out: Annotated[Path, typer.Option(help="Output folder: transforms.json, spots.csv, matches.csv, graph.pt, figures/.")],
    force: Annotated[bool, flag(help="Overwrite earlier registration results in OUT.")] = False,
    um_per_px: UmPerPxOption = None,
    spot_diameter_um: Annotated[Optional[float], typer.Option(help="Virtual spot diameter in µm on H&E-only sections (default: the first section with spots, else Visium's 55).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Virtual spot pitch in µm on H&E-only sections (default: the first section with spots, else Visium's 100).")] = None,
):
    """Align serial sections onto the first one, match spots across layers and build the 3D spot graph.

    A section may be an H&E image alone: virtual spots are laid on its tissue with the spot grid of the first section with spots.
    Example: [bold]stimpute register ../shared/data/her2st/C2 ../shared/data/her2st/C3 ../shared/data/her2st/C4 --out registered/[/]
    Example: [bold]stimpute register he/C2.jpg ../shared/data/her2st/C3 he/C4.jpg --um-per-px 0.5 --out registered/[/]
    """
    from stimpute.io import read_stack
    from stimpute.files import run_ownership
    from stimpute.register.grid import GridOptions
    from stimpute.io.registration import OUTPUT_NAMES, write_registration

    grid = GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um)
    with run_ownership(out, "register", sections, force) as run:
        stack = read_stack(sections, um_per_px=um_per_px)
        force = run.claim([name + "/" if name == "figures" else name for name in OUTPUT_NAMES])
        result = write_registration(stack, out, force=force, progress=True, grid=grid)
    table = Table("pair", "Dice before", "Dice after", "stain NCC", "angle", "mirrored", "seconds")
    for row in result["registration"].pairs.itertuples():
        table.add_row(f"{row.moving} → {row.fixed}", f"{row.dice_before:.3f}", f"{row.dice_after:.3f}",
                      f"{row.ncc_after:.3f}", f"{row.angle_deg:.0f}°", "yes" if row.mirrored else "no", f"{row.seconds:.1f}")
    console.print(table)
    fractions = ", ".join(f"{name} {frac:.0%}" for name, frac in result["matched_fraction"].items())
    console.print(f"spots with a cross-layer match: {fractions}; graph: {result['n_edges']} edges → {out}", highlight=False)


@app.command()
@guarded
def features(
    sections: Sections,
    out: Annotated[Path, typer.Option(help="Cache folder: one <section>.features.h5 per section.")],
    encoder: EncoderOption = "handcrafted",
    weights: WeightsOption = None,
    batch_size: Annotated[int, typer.Option(help="Spots per batch (× 3 scales patches).", min=1)] = 32,
    stain_normalize: Annotated[bool, flag(help="Macenko-normalise the H&E stain before encoding.")] = False,
    device: DeviceOption = "auto",
    devices: DevicesOption = "1",
    num_nodes: NumNodesOption = 1,
    strategy: StrategyOption = "auto",
):
    """Compute (or reuse) per-spot image features at 3 scales and cache them in OUT.

    Example: [bold]stimpute features ../shared/data/her2st/C2 ../shared/data/her2st/C3 --out features/[/]
    Example (2 GPUs): [bold]stimpute features sections/* --out features/ --encoder uni --weights uni.bin --device cuda --devices 2 --strategy ddp[/]
    """
    from contextlib import nullcontext

    from stimpute.feature_runs import INDEX_FILE, FeatureRuns
    from stimpute.files import run_ownership

    index = FeatureRuns(out, encoder, weights, stain_normalize)
    compute = None
    # several processes share each section; rank 0 owns OUT and writes, the others only read its caches
    with run_ownership(out, "features", [*sections, weights]) if is_rank_zero() else nullcontext() as owner:
        if owner is not None:
            owner.claim(caches=[INDEX_FILE])
        for path in sections:
            record = index.cached(path)  # an unchanged input whose cache holds its features: nothing is read
            if record is not None:
                if owner is not None:
                    owner.claim(caches=[record["cache_file"]])
                console.print(f"{record['head']}read from cache in 0.0 s{record['tail']}", highlight=False)
                continue
            compute = compute or _feature_computer(out, encoder, weights, batch_size, stain_normalize, device, devices,
                                                   num_nodes, strategy, [p for p in sections if index.cached(p) is None])
            index.add(path, *compute(path, owner))
        if owner is not None:
            index.save()


def _feature_computer(out, encoder, weights, batch_size, stain_normalize, device, devices, num_nodes, strategy, todo):
    """`stimpute features` for one input: read it, compute its features or read them from its
    cache, print what was done; returns (cache file, line head, line tail) for `FeatureRuns`.
    Built once, for the inputs `todo` that `FeatureRuns` could not answer (checked here)."""
    from stimpute.device import parallel_options, resolve_device
    from stimpute.features import spot_features
    from stimpute.features.cache import cache_path
    from stimpute.features.encoders import get_spec
    from stimpute.features.stored import check_encoder
    from stimpute.io import read_section
    from stimpute.io.image_section import refuse_images

    refuse_images(todo, "features")
    check_encoder(encoder, weights)
    accelerator = resolve_device(device if encoder and get_spec(encoder).needs_weights else "cpu")  # handcrafted: CPU, no torch
    hardware = {"accelerator": accelerator, **parallel_options(accelerator, devices, num_nodes, strategy)}

    def compute(path, owner):
        section = read_section(path)
        if owner is not None:
            owner.claim(caches=[cache_path(out, section).name])
        runs = []
        feats = spot_features(section, encoder=encoder, weights=weights, cache_dir=out, progress=is_rank_zero(),
                              batch_size=batch_size, stain_normalize=stain_normalize, runs=runs, hardware=hardware)
        run = runs[-1]
        by = f" by {len(run.shares)} processes ({'+'.join(map(str, run.shares))} spots)" if len(run.shares) > 1 else ""
        how = "read from cache" if run.cached else f"computed{by} ({run.rate:.1f} patches/s)"
        padded = ", ".join(f"{k} {v}" for k, v in run.padded.items())
        head = f"{section.name}: {encoder} features {feats.shape[0]}×{feats.shape[1]}×{feats.shape[2]} "
        tail = f" → {run.cache_file}; spots padded at the border: {padded}"
        console.print(f"{head}{how} in {run.seconds:.1f} s{tail}", highlight=False)
        section.image.release()
        return run.cache_file, head, tail

    return compute


@app.command()
@guarded
def impute(
    sections: ImageSections,
    known: Annotated[str, typer.Option(help="Name of the section with measured ST (e.g. C3), or several joined by commas (C2,C4): all are used for training, transfer and calibration.")],
    out: Annotated[Path, typer.Option(help="Output folder: <section>.h5ad per imputed section, block.h5ad (every section, 3D), view.html (the block in 3D), config.yaml, figures/, metrics.csv.")],
    genes: Annotated[Optional[Path], typer.Option(help="Gene panel file, one symbol per line (default: top 250 HVGs of the known section).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the training split, initialisation and dropout.")] = 0,
    epochs: Annotated[int, typer.Option(help="Maximum MSAGNet training epochs (early stopping on held-out known spots).", min=1)] = 200,
    force: Annotated[bool, flag(help="Overwrite earlier results in OUT (an unfinished, killed run is resumed without it).")] = False,
    fusion: Annotated[str, typer.Option(help="Fusion of propagated and model parts (as per-gene z-scores), each spot's propagated share scaled by its reach: 'calibrated' (per-gene shares fitted on held-out known spots; the default, chosen on the validation protocol and the Visium-like block of benchmarks/README.md), 'fixed' (share 2/3 for every gene) or 'even' (half each).")] = DEFAULT_FUSION,
    programs: Annotated[str, typer.Option(help="Gene programs: both parts are projected on this many principal axes of the known expression before fusion: 'auto' (rank cross-validated on the known spots), 'none', or a number.")] = "auto",
    encoder: StackEncoderOption = None,
    weights: WeightsOption = None,
    um_per_px: UmPerPxOption = None,
    spot_diameter_um: Annotated[Optional[float], typer.Option(help="Virtual spot diameter in µm (default: the known section's).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Virtual spot centre-to-centre distance in µm (default: the known section's).")] = None,
    grid_scale: Annotated[float, typer.Option(help="Virtual grid pitch as a multiple of --pitch-um: 0.5 lays a super-resolution grid at half the pitch (4x the spots on a square array).")] = 1.0,
    device: DeviceOption = "auto",
    devices: DevicesOption = "1",
    num_nodes: NumNodesOption = 1,
    strategy: StrategyOption = "auto",
    batch_nodes: BatchNodesOption = None,
    figures: Annotated[str, typer.Option(help="Figures written in OUT/figures: key (each imputed section's gene maps and block_3d.png), all (also the registration QC: overlay_<a>_<b>.png, spots_3d.png) or none.")] = "key",
):
    """Impute the expression of every section from the measured (--known) sections (ASIGN: MSAGNet 3D + cross-layer imputation).

    A section may be an H&E image alone (JPEG, PNG, TIFF, pyramidal WSI): it is named by its file name without
    extension, and virtual spots are laid on its tissue with the known section's spot grid, registered so they lie
    above the measured spots.

    Example: [bold]stimpute impute ../shared/data/her2st/C2 ../shared/data/her2st/C3 ../shared/data/her2st/C4 --known C3 --out imputed/[/]
    Example: [bold]stimpute impute sec2.jpg ../shared/data/her2st/C3 sec4.tif --known C3 --out imputed/ --grid-scale 0.5[/]
    """
    from stimpute.device import check_batch_nodes, parallel_options, resolve_device
    from stimpute.combine import FUSIONS
    from stimpute.pipeline import run_impute
    from stimpute.register.grid import GridOptions
    from stimpute.models.msagnet import TrainConfig

    accelerator = resolve_device(device)
    config = TrainConfig(seed=seed, max_epochs=epochs, accelerator=accelerator,
                         **parallel_options(accelerator, devices, num_nodes, strategy),
                         **({} if batch_nodes is None else {"batch_nodes": check_batch_nodes(batch_nodes)}))
    if fusion not in FUSIONS:
        raise StimputeError("--fusion", f"unknown fusion {fusion!r} (use {', '.join(FUSIONS)})")
    if programs not in ("auto", "none") and not (programs.isdigit() and int(programs) >= 1):
        raise StimputeError("--programs", f"{programs!r} is not 'auto', 'none' or a rank ≥ 1")
    grid = GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um, grid_scale=grid_scale)
    run = run_impute(sections, known, out, genes=genes, seed=seed, force=force, progress=True, config=config, fusion=fusion,
                     encoder=encoder, weights=weights, um_per_px=um_per_px, grid=grid,
                     programs=programs if programs in ("auto", "none") else int(programs), figures=figures)
    _report_impute(run)


def _report_impute(run) -> None:
    """Files written, then per-gene PCC summaries and the ASIGN paper's per-spot PCC."""
    console.print(f"wrote {len(run.files)} files to {run.out} (mean propagated share {float(run.result.fusion.gene_share.mean()):.2f})", highlight=False)
    _report_accuracy(run.summary, "imputation")


def _report_accuracy(summary, what: str) -> None:
    """The per-target table of per-gene PCC summaries and the paper's per-spot PCC, and one closing line."""
    if not summary.rows:
        console.print("targets carry no measured counts: no metrics")
        return
    table = Table(title=f"{what} accuracy (per-gene PCC across spots; last column: ASIGN paper's metric)")
    for col in ("targets", "panel mean", "panel median", "top-50 HVG mean", "top-50 HVG median", "per-spot PCC across genes (paper)"):
        table.add_column(col)
    for row in summary.rows:
        p, t = row["panel"], row["top50"]
        table.add_row(row["targets"], f"{p.mean:.3f}", f"{p.median:.3f}", f"{t.mean:.3f}", f"{t.median:.3f}", f"{row['spot_pcc']:.3f}")
    console.print(table)
    last = summary.rows[-1]
    console.print(f"mean per-gene PCC {last['panel'].mean:.3f} over the panel, {last['top50'].mean:.3f} over its top-50 HVGs; "
                  f"the ASIGN paper's metric (PCC per spot across genes, runs far higher): {last['spot_pcc']:.3f}",
                  highlight=False, soft_wrap=True)


@app.command()
@guarded
def advise(
    sections: ImageSections,
    budget: Annotated[int, typer.Option(help="How many sections you can afford to measure (the size of the known set).")],
    out: Annotated[Path, typer.Option(help="Output folder: advice.csv (rank, known, expected_pcc, score, gap, tie), advice.md, advice.png, cache/.")],
    encoder: Annotated[Optional[str], typer.Option(help="Feature encoder (the cache in OUT/cache is shared with `impute`); default: the features the sections carry, else handcrafted.")] = None,
    force: Annotated[bool, flag(help="Overwrite earlier advice in OUT.")] = False,
    um_per_px: UmPerPxOption = None,
    spot_diameter_um: Annotated[Optional[float], typer.Option(help="Virtual spot diameter in µm on H&E-only sections (default: the first section with spots, else Visium's 55).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Virtual spot pitch in µm (default: the first section with spots, else Visium's 100).")] = None,
):
    """Which sections to measure: rank every known set of --budget sections by expected imputation accuracy, from H&E alone.

    Counts, where present, are never read; a section may be an H&E image alone (virtual spots are laid on it).
    Example: [bold]stimpute advise ../shared/data/her2st/C2 ../shared/data/her2st/C3 ../shared/data/her2st/C4 --budget 1 --out advice/[/]
    Example: [bold]stimpute advise s1.tif s2.tif s3.tif s4.tif s5.tif --budget 2 --um-per-px 0.5 --out advice/[/]
    """
    from stimpute.advise import run_advise
    from stimpute.register.grid import GridOptions

    grid = GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um)
    result, files = run_advise(sections, budget, out, encoder=encoder, force=force, progress=True, um_per_px=um_per_px, grid=grid)
    table = Table("rank", "known", "score", "tie", title=f"known sets of {budget} ({result.search})")
    for row in result.table.head(10).itertuples():
        table.add_row(str(row.rank), row.known, f"{row.score:.3f}", "tie" if row.tie else "")
    console.print(table)
    console.print(f"measure {result.table.known.iloc[0]}; reasoning in {files[1]}", highlight=False)


@app.command()
@guarded
def train(
    sections: Sections,
    out: Annotated[Path, typer.Option(help="Model folder: the model (msagnet_2d: checkpoints/best.ckpt; asign: asign/) and config.yaml.")],
    genes: Annotated[Optional[Path], typer.Option(help="Gene panel file (default: top 250 HVGs of the sections).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping on held-out spots; moe3d trains a fixed number of full-batch steps).", min=1)] = 300,
    force: Annotated[bool, flag(help="Overwrite an earlier model in OUT.")] = False,
    method: Annotated[str, typer.Option(help="A registered model: msagnet_2d (2D MSAGNet), asign (ASIGN: registers the sections and keeps them to impute new ones), nh2st (NH²2ST), moe3d (3DMoEST without coordinates), ... (stimpute.models.MODELS; msagnet: the old name of msagnet_2d).")] = "msagnet_2d",
    mode: Annotated[str, typer.Option(help="train, or cv: k-fold cross-validation by section, writing cv_metrics.csv.")] = "train",
    folds: Annotated[Optional[int], typer.Option(help="Folds of --mode cv (default: one per section).", min=2)] = None,
    encoder: StackEncoderOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    devices: DevicesOption = "1",
    num_nodes: NumNodesOption = 1,
    strategy: StrategyOption = "auto",
    batch_nodes: BatchNodesOption = None,
):
    """Train a model (2D MSAGNet, NH²2ST, 3DMoEST or ASIGN) on measured sections, for `stimpute predict`.

    Example: [bold]stimpute train ../shared/data/her2st/C2 ../shared/data/her2st/C4 --out model/ --method moe3d[/]
    Example: [bold]stimpute train ../shared/data/her2st/C2 ../shared/data/her2st/C3 ../shared/data/her2st/C4 --out cv/ --method nh2st --mode cv[/]
    Example: [bold]stimpute train ../shared/data/her2st/C3 ../shared/data/her2st/C4 --out asign-model/ --method asign[/]
    """
    from stimpute.device import parallel_options, resolve_device
    from stimpute.pipeline import run_train

    parallel = parallel_options(resolve_device(device), devices, num_nodes, strategy)
    ckpt = run_train(sections, out, genes=genes, seed=seed, force=force, progress=True, epochs=epochs, method=method,
                     mode=mode, folds=folds, encoder=encoder, weights=weights, device=device, parallel=parallel,
                     batch_nodes=batch_nodes)
    console.print(f"{'cross-validation by section' if mode == 'cv' else 'model'} written to {ckpt}", highlight=False)
    if mode == "cv":
        console.print(cv_table(ckpt))


def cv_table(path: Path) -> Table:
    """Per held-out section of `train --mode cv` (cv_metrics.csv), and over all: per-gene PCC and MSE."""
    import pandas as pd

    rows = pd.read_csv(path)
    table = Table(title="cross-validation by section: per-gene PCC across spots of each held-out section")
    for col in ("fold", "section", "mean PCC", "median PCC", "MSE"):
        table.add_column(col, no_wrap=True)
    groups = [(str(fold), section, part) for (fold, section), part in rows.groupby(["fold", "section"], sort=False)]
    for fold, section, part in groups + [("", "all", rows)]:
        table.add_row(fold, section, f"{part.pcc.mean():.3f}", f"{part.pcc.median():.3f}", f"{part.mse.mean():.3f}")
    return table


@app.command()
@guarded
def predict(
    sections: ImageSections,
    model: Annotated[Path, typer.Option(help="Model folder written by `stimpute train`.")],
    out: Annotated[Path, typer.Option(help="Output folder: <section>.h5ad per section, figures/, config.yaml, metrics.csv when sections carry counts.")],
    force: Annotated[bool, flag(help="Overwrite earlier results in OUT.")] = False,
    method: Annotated[Optional[str], typer.Option(help="The model's method (msagnet_2d, nh2st, moe3d or asign); read from the model folder, checked when given.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="The model's feature encoder; read from the model folder, checked when given.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="The encoder's local weight file, checked against the one the model was trained with (default: the recorded path).")] = None,
    um_per_px: UmPerPxOption = None,
    spot_diameter_um: Annotated[Optional[float], typer.Option(help="Virtual spot diameter in µm on H&E-only sections (default: the training sections', else Visium's 55).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Virtual spot pitch in µm on H&E-only sections (default: the training sections', else Visium's 100).")] = None,
    order: Annotated[Optional[str], typer.Option(help="An ASIGN model: every section's name, its known ones and the new ones, in cutting order, joined by commas (default: the known sections, then the new ones).")] = None,
):
    """Predict expression with a trained model: from the H&E image alone (2D MSAGNet, NH²2ST or 3DMoEST), or with ASIGN.

    A section may be an H&E image alone: a hexagonal grid of virtual spots is laid on its tissue. An ASIGN model registers
    each section onto its nearest known section and imputes it from its image and the stored known spots. Sections that
    carry counts are scored (metrics.csv and the accuracy table).
    Example: [bold]stimpute predict ../shared/data/her2st/C3 --model model/ --out predicted/[/]
    Example: [bold]stimpute predict he/C5.tif --um-per-px 0.5 --model model/ --out predicted/[/]
    Example: [bold]stimpute predict ../shared/data/her2st/C2 --model asign-model/ --order C2,C3,C4 --out predicted/[/]
    """
    from stimpute.pipeline import RunSummary, run_predict
    from stimpute.register.grid import GridOptions

    grid = GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um)
    summary = RunSummary()
    files = run_predict(sections, model, out, force=force, progress=True, method=method, encoder=encoder, weights=weights,
                        um_per_px=um_per_px, grid=grid, summary=summary,
                        order=[n.strip() for n in order.split(",") if n.strip()] if order else None)
    console.print(f"wrote {len(files)} files to {out}", highlight=False)
    _report_accuracy(summary, "prediction")


@app.command()
@guarded
def demo(
    out: Annotated[Path, typer.Option(help="Output folder of the demo imputation; a demo run again replaces its own earlier outputs there.")] = Path("stimpute-demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, flag(help="Overwrite earlier results of another stimpute command in OUT (files no stimpute run wrote are never replaced).")] = False,
):
    """Run `stimpute impute` on the built-in HER2-ST mini stack (C2, C3, C4) with C3 known.

    The demo owns its folder: run again, it replaces the outputs of the earlier demo (reusing its feature cache).
    Example: [bold]stimpute demo --out stimpute-demo[/]
    """
    from stimpute.datasets import HER2ST_MINI_SECTIONS, her2st_mini_path
    from stimpute.files import read_manifest
    from stimpute.pipeline import run_impute

    sections = [her2st_mini_path() / name for name in HER2ST_MINI_SECTIONS]
    console.print(f"imputing C2 and C4 of the built-in HER2-ST mini stack from C3 → {out}", highlight=False)
    own = read_manifest(out).get("command") == "demo"  # the last run in OUT was a demo: its outputs are the demo's own
    _report_impute(run_impute(sections, "C3", out, seed=seed, force=force or own, progress=True, command="demo"))


@app.command()
@guarded
def view(
    out: Annotated[Path, typer.Argument(help="Output folder of `stimpute impute` or `stimpute demo` (holds block.h5ad).")],
    gene: Annotated[Optional[str], typer.Option(help="Gene shown first (default: ERBB2 or MDK where in the panel, else the most variable); the page's search box lists the others.")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Write the page to this file instead of OUT/view.html.")] = None,
):
    """Write the block in 3D as one self-contained page (OUT/view.html) that opens offline in a browser.

    H&E planes at each section's depth, spots at true size coloured by a gene (search box) or by their confidence,
    measured spots ringed, measured values beside imputed ones; rotate, zoom and pan. `stimpute impute` writes it too.
    Example: [bold]stimpute view stimpute-demo --gene MDK[/]
    """
    from stimpute.io.results import BLOCK_FILE
    from stimpute.files import check_inputs, read_manifest, run_ownership
    from stimpute.view import VIEW_FILE, write_view

    if not (out / BLOCK_FILE).is_file():
        raise StimputeError(out, f"no {BLOCK_FILE}: give the output folder of `stimpute impute`")
    if html is not None:
        check_inputs(html, [out / BLOCK_FILE])
        path = write_view(out, html, gene)
    else:
        previous = read_manifest(out)
        if previous.get("status") == "running":
            raise StimputeError(out, f"holds an unfinished `stimpute {previous.get('command')}` run: run it again to finish it first")
        # a rendering of OUT's own block, always redrawn; the folder stays the run's (a demo reruns over it)
        with run_ownership(out, previous.get("command", "view")) as run:
            run.claim(derived=[VIEW_FILE])
            path = write_view(out, out / VIEW_FILE, gene)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): open it in a web browser", highlight=False, soft_wrap=True)


@app.command()
@guarded
def benchmark(
    sections: Sections,
    out: Annotated[Path, typer.Option(help="Output folder: results.csv, summary.md, splits.json, spots.csv, pcc_boxplot.png and the feature cache.")],
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names (default: every registered method).")] = None,
    protocols: Annotated[str, typer.Option(help="3d (each measured section known in turn) and/or 2d (leave-one-section-out, images only).")] = "3d,2d",
    seed: Annotated[int, typer.Option(help="Seed passed to every method.")] = 0,
    encoder: StackEncoderOption = None,
    force: Annotated[bool, flag(help="Overwrite earlier results in OUT (the feature cache is always reused).")] = False,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    devices: DevicesOption = "1",
    num_nodes: NumNodesOption = 1,
    strategy: StrategyOption = "auto",
):
    """Run every method under the 3D and 2D protocols and write the comparison table.

    Example: [bold]stimpute benchmark ../shared/data/her2st/C2 ../shared/data/her2st/C3 ../shared/data/her2st/C4 --out bench/[/]
    """
    import os
    import platform
    import sys
    from datetime import date

    from stimpute.device import parallel_options, resolve_device
    from stimpute.distributed import rank_output
    from stimpute.benchmark import check_benchmark, run_benchmark
    from stimpute.features.stored import check_encoder
    from stimpute.io import read_stack
    from stimpute.pipeline import input_records
    from stimpute.figures import pcc_boxplot
    from stimpute.prepare import prepare_stack

    from stimpute.io.image_section import refuse_images
    from stimpute.files import run_ownership

    refuse_images(sections, "benchmark")
    check_encoder(encoder, weights)
    accelerator = resolve_device(device)
    parallel = parallel_options(accelerator, devices, num_nodes, strategy)
    with rank_output(out) as out, run_ownership(out, "benchmark", [*sections, weights], force) as run:
        names, grid = check_benchmark(out, _csv(methods), _csv(protocols), force=True)  # OUT is checked by claim
        force = run.claim(["results.csv", "spots.csv", "splits.json", "summary.md", "pcc_boxplot.png"], caches=["features/"])
        stack = read_stack(sections)
        console.print(f"preparing {', '.join(stack.names)}: panel, features (cached in {out / 'features'}), registration, graph")
        prepared = prepare_stack(stack, encoder=encoder, weights=weights, cache_dir=out / "features", progress=is_rank_zero(),
                                 hardware={"accelerator": accelerator, **parallel})
        settings = {"command": " ".join(["stimpute", *sys.argv[1:]]), "date": date.today().isoformat(),
                    "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs", **prepared.settings["features"],
                    "inputs": input_records(stack, sections), "accelerator": accelerator, **parallel}
        result = run_benchmark(prepared, out, names, grid, seed=seed, force=force, progress=True, settings=settings,
                               accelerator=accelerator, parallel=parallel)
        plot = pcc_boxplot(result.results, out / "pcc_boxplot.png", names)
    console.print(benchmark_table(result.summary))
    console.print(f"wrote {', '.join(str(p) for p in [*result.files.values(), plot])}", highlight=False)


def benchmark_table(summary) -> Table:
    """The summary on the terminal: per-gene PCC (headline), the paper's per-spot PCC, cost."""
    table = Table(title="benchmark: per-gene PCC across spots (mean ± sd); per-spot PCC is the ASIGN paper's metric")
    for col in ("method", "protocol", "per-gene PCC", "top-50 HVG", "per-spot PCC", "MSE", "s", "status"):
        table.add_column(col, no_wrap=col != "status")
    for row in summary.itertuples():
        def fmt(mean, sd):
            return "–" if row.n_values == 0 else f"{mean:.3f} ± {sd:.3f}"

        table.add_row(row.method, row.protocol, fmt(row.pcc, row.pcc_sd), fmt(row.pcc_hvg, row.pcc_hvg_sd),
                      fmt(row.spot_pcc, row.spot_pcc_sd), "–" if row.n_values == 0 else f"{row.mse:.3f}",
                      f"{row.seconds:.1f}", row.status.split(":")[0])
    return table


def _csv(text: str | None) -> list[str]:
    return [t.strip().lower() for t in (text or "").split(",") if t.strip()]


def main() -> None:  # pragma: no cover - console entry point
    app()
