"""``polystore demo``: a synthetic high-content screen in a fresh SQLite catalog.

Two 96-well plates, four sites per well, one 256x256 ``uint16`` image per
site, plus a JSON metadata file per well. Images carry attributes (plate, well,
row, column, site, compound, concentration, the number of cells drawn), so the
SQL queries at the end have something to find. Everything is generated from
fixed seeds: a second run builds the same catalog, and the sample loaded back
can be checked against a freshly generated copy.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from polystore.cli.app import State, main, pass_state
from polystore.cli.output import human_size, print_table, progress

if TYPE_CHECKING:
    import numpy as np

__all__ = ["demo"]

ROWS = "ABCDEFGH"
COLUMNS = range(1, 13)
#: Marks a directory as made by the demo, so a re-run may replace it.
MARKER = ".polystore-demo"

QUERIES = [
    (
        "What the catalog holds",
        (
            "SELECT kind, serializer, dtype, COUNT(*) AS entries, SUM(size) AS bytes\n"
            "FROM polystore_catalog GROUP BY kind, serializer, dtype ORDER BY entries DESC"
        ),
    ),
    (
        "Mean cells per image, by compound (from the images' attributes)",
        (
            "SELECT json_extract(attrs, '$.compound') AS compound,\n"
            "       COUNT(*) AS images,\n"
            "       ROUND(AVG(json_extract(attrs, '$.cells')), 1) AS mean_cells\n"
            "FROM polystore_catalog WHERE dtype = 'uint16'\n"
            "GROUP BY compound ORDER BY mean_cells"
        ),
    ),
    (
        "The files of well plate2/C07",
        (
            "SELECT path, serializer, shape, size, json_extract(attrs, '$.cells') AS cells\n"
            "FROM polystore_catalog\n"
            "WHERE json_extract(attrs, '$.plate') = 'plate2'\n"
            "  AND json_extract(attrs, '$.well') = 'C07'\n"
            "ORDER BY path"
        ),
    ),
]


def _treatment(row: int, column: int) -> tuple[str, float]:
    """Compound and concentration (uM) of a well: controls in columns 1 and 12."""
    if column == 1:
        return "DMSO", 0.0
    if column == 12:
        return "staurosporine", 1.0
    compound = ("cmpd-A", "cmpd-B", "cmpd-C", "cmpd-D")[row // 2]
    return compound, round(0.03 * 3 ** ((column - 2) / 1.5), 3)


def _expected_cells(compound: str, concentration: float) -> float:
    """How many cells a site shows: toxic compounds thin them out with dose."""
    potency = {"DMSO": 0.0, "staurosporine": 50.0, "cmpd-A": 0.0, "cmpd-B": 0.2,
               "cmpd-C": 1.0, "cmpd-D": 5.0}[compound]  # fmt: skip
    return 40.0 / (1.0 + potency * concentration)


def _image(plate: int, row: int, column: int, site: int, size: int) -> tuple[np.ndarray, int]:
    """One synthetic nucleus-stain image and the number of cells drawn in it."""
    import numpy as np

    rng = np.random.default_rng([plate, row, column, site])
    compound, concentration = _treatment(row, column)
    cells = int(rng.poisson(_expected_cells(compound, concentration)))
    image = rng.normal(300.0, 20.0, (size, size))
    radius = 6
    yy, xx = np.mgrid[-2 * radius : 2 * radius + 1, -2 * radius : 2 * radius + 1]
    spot = np.exp(-(xx**2 + yy**2) / (2.0 * radius**2))
    for y, x, brightness in zip(
        rng.integers(0, size - spot.shape[0], cells),
        rng.integers(0, size - spot.shape[1], cells),
        rng.uniform(2000.0, 6000.0, cells),
        strict=True,
    ):
        image[y : y + spot.shape[0], x : x + spot.shape[1]] += brightness * spot
    return np.clip(image, 0, 65535).astype(np.uint16), cells


def _prepare(directory: Path) -> Path:
    """An empty demo directory: a previous demo's is replaced, anything else refused."""
    if directory.exists():
        if not (directory / MARKER).exists() and any(directory.iterdir()):
            raise click.ClickException(
                f"{directory} exists and was not made by `polystore demo`; "
                "choose another directory with --path"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `polystore demo`; removed by the next run\n")
    return directory / "catalog.db"


def _heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True)


@main.command()
@click.option(
    "--path",
    "directory",
    default="demo-catalog",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the demo catalog (catalog.db inside); replaced on every run.",
)
@click.option("--plates", default=2, show_default=True, type=click.IntRange(1, 20))
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--size", default=256, show_default=True, type=click.IntRange(32, 2048), help="Image side."
)
@pass_state
def demo(state: State, directory: Path, plates: int, sites: int, size: int) -> None:
    """Build a synthetic screening dataset in a fresh SQLite catalog and query it.

    Saves plates x 96 wells x sites images (uint16) and a JSON file per well
    through a FileManager, runs SQL over the ``polystore_catalog`` view, loads
    a sample back and checks it. The demo always makes its own catalog in
    --path, whatever --url says.
    """
    from polystore import FileManager
    from polystore.cli.sql import run_readonly

    started = time.perf_counter()
    catalog = _prepare(directory)
    url = f"sqlite:///{catalog}"
    wells = [(r, c) for r in range(len(ROWS)) for c in COLUMNS]
    n_images = plates * len(wells) * sites
    click.echo(
        f"Building a synthetic screen: {plates} plates x {len(wells)} wells x {sites} sites "
        f"of {size}x{size} uint16 images ({n_images} images, "
        f"{human_size(n_images * size * size * 2)}) plus one JSON file per well."
    )

    with FileManager(url) as fm:
        _save_screen(state, fm, plates, wells, sites, size)
        saved = time.perf_counter() - started
        click.echo(
            f"Saved {n_images + plates * len(wells) + 1} files in {saved:.1f} s into {catalog}"
        )
        for title, sql in QUERIES:
            _heading(title)
            click.echo("  " + sql.replace("\n", "\n  "))
            result = run_readonly(url, sql)
            print_table(result.columns, result.rows)
        _back_in_python(fm, plates, sites, size)

    _next_steps(catalog, time.perf_counter() - started)


def _save_screen(
    state: State, fm: Any, plates: int, wells: list[tuple[int, int]], sites: int, size: int
) -> None:
    """Save the README, then each plate's wells, a plate a transaction."""
    fm.save(
        f"Synthetic screen made by `polystore demo`: {plates} plates, {sites} sites per "
        "well.\nImages: plateN/<well>/siteK.npy; metadata: plateN/<well>/metadata.json\n",
        "README.txt",
    )
    with progress(state, plates * len(wells), "saving wells") as advance:
        for plate in range(1, plates + 1):
            # One transaction per plate: a plate appears whole or not at all.
            with fm.transaction():
                for row, column in wells:
                    _save_well(fm, plate, row, column, sites, size)
                    advance(1)


def _back_in_python(fm: Any, plates: int, sites: int, size: int) -> None:
    """Query and load from Python, and check the last image against the one generated."""
    import numpy as np

    _heading("Back in Python")
    backend: Any = fm.get_backend()
    hits = backend.query(kind="file", attrs={"compound": "staurosporine"})
    click.echo(f"  SQLBackend.query(attrs={{'compound': 'staurosporine'}}) -> {len(hits)} files")
    sample = f"plate{plates}/H12/site{sites}.npy"
    loaded = fm.load(sample)
    expected, _ = _image(plates, 7, 12, sites, size)
    if not (loaded.dtype == np.uint16 and np.array_equal(loaded, expected)):
        raise click.ClickException(f"{sample} did not load back as saved")
    click.echo(
        f"  fm.load({sample!r}) -> {loaded.dtype} array {loaded.shape}, identical to "
        "the image generated: verified"
    )
    meta = fm.load(f"plate{plates}/H12/metadata.json")
    click.echo(f"  fm.load('plate{plates}/H12/metadata.json') -> {meta}")


def _save_well(fm: Any, plate: int, row: int, column: int, sites: int, size: int) -> None:
    well = f"{ROWS[row]}{column:02d}"
    compound, concentration = _treatment(row, column)
    base = {
        "plate": f"plate{plate}",
        "well": well,
        "row": ROWS[row],
        "column": column,
        "compound": compound,
        "concentration_uM": concentration,
    }
    for site in range(1, sites + 1):
        image, cells = _image(plate, row, column, site, size)
        fm.save(
            image,
            f"plate{plate}/{well}/site{site}.npy",
            attrs=base | {"site": site, "cells": cells},
        )
    metadata = base | {"sites": sites, "channel": "DAPI", "pixel_size_um": 0.65}
    fm.save(metadata, f"plate{plate}/{well}/metadata.json", attrs=base)


def _program() -> tuple[str, str | None]:
    """How a fresh shell runs this polystore, and the venv's activate script if it is one.

    ``polystore`` when that name on ``PATH`` is this very program; otherwise
    the path it was started by (``.venv/bin/polystore`` after ``make demo``),
    so that every command printed works when pasted as it is.
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.name == "__main__.py" or not script.is_file():
        program = f"{shlex.quote(sys.executable)} -m polystore"
    else:
        found = shutil.which("polystore")
        if found is not None and Path(found).resolve() == script.resolve():
            return "polystore", None
        program = shlex.quote(_short(script))
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():
        return program, shlex.quote(_short(activate))
    return program, None


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute."""
    full = path.absolute()
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(full)


def _next_steps(catalog: Path, elapsed: float) -> None:
    url = shlex.quote(f"sqlite:///{catalog.resolve()}")
    _heading(f"Done in {elapsed:.1f} s. The catalog is {catalog.resolve()}")
    click.echo(f"  ({human_size(catalog.stat().st_size)}; run the demo again to rebuild it)")
    program, activate = _program()
    click.echo("\nTry next (paste these lines into a shell):")
    for line in (
        f"export POLYSTORE_URL={url}",
        "polystore ls -l plate1/A01",
        "polystore tree -L 1",
        "polystore du plate1",
        "polystore stat plate1/A01/site1.npy",
        "polystore cat plate1/A01/metadata.json",
        (
            "polystore query \"SELECT path, json_extract(attrs, '$.cells') AS cells "
            "FROM polystore_catalog WHERE dtype = 'uint16' ORDER BY cells DESC LIMIT 5\""
        ),
        "polystore get plate1/A01 ./A01",
        "polystore ls 'plate1/A0*/site1.npy'",
    ):
        if line.startswith("polystore "):
            line = program + line[len("polystore") :]
        click.echo(f"  {line}")
    if activate is not None:
        click.echo(f"\n(or run `source {activate}` once, then type just `polystore ...`)")
