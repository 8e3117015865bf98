"""Command line: ``omx demo``, ``omx predict``, ``omx bench``."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

DEMO_GENES = ("GNAS", "FASN", "KRT8", "COL1A1")  # members of the 785-gene panel of the sample


def _print_summary(summary: dict, title: str) -> None:
    print(title)
    print(f"  {'gene set':<15}{'genes':>6}{'Pearson r':>11}{'Spearman':>10}{'CCC':>8}")
    for name, stats in summary.items():
        print(
            f"  {name:<15}{stats['n_genes']:>6}{stats['pearson']:>11.3f}{stats['spearman']:>10.3f}{stats['ccc']:>8.3f}"
        )


class CLIError(Exception):
    """A problem with the command's inputs or outputs: reported in one line on stderr, exit code 2, no traceback."""


STORE = "a SpatialData .zarr store (the folder that `sdata.write(path)` writes)"
DEMO_FILES = ("observed_vs_predicted.png", "gene_scores.png", "model", "her2st_sample_pred.zarr")


def _check_demo_out(out: Path) -> list[Path]:
    """Every path `omx demo` writes in ``out``; a `CLIError` naming those that exist (nothing is replaced)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; expected a folder (new, or without the files omx demo writes).")
    outputs = [out / name for name in DEMO_FILES]
    taken = [p.name for p in outputs if p.exists() or p.is_symlink()]
    if taken:
        raise CLIError(
            f"{out} already holds {', '.join(taken)}, which omx demo writes; it never replaces files. Pass another "
            "--out, or move them away."
        )
    return outputs


def demo(out: Path, model: str = "ridge", seed: int = 0) -> int:
    """Fit on two sections of the packaged her2st sample, predict the third, report scores, write files.

    Every output is checked before the data are read: an existing one stops the command and nothing is written.
    When the command fails, the outputs it had written are removed again.
    """
    png, scores_png, model_dir, zarr_path = outputs = _check_demo_out(out)
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _demo(png, scores_png, model_dir, zarr_path, model=model, seed=seed)
    except BaseException:
        for path in outputs:  # none of them existed when the command started
            _remove(path)
        if made_out and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"Wrote {png}, {scores_png}, the model to {model_dir} and the SpatialData to {zarr_path}.")
    return 0


def _demo(png: Path, scores_png: Path, model_dir: Path, zarr_path: Path, *, model: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import omx

    t0 = time.perf_counter()
    sdata = omx.datasets.her2st_sample()
    sections = list(sdata.tables["table"].obs["section"].cat.categories)
    train, predict = sections[:-1], sections[-1]
    print(f"Loaded the packaged her2st sample: sections {sections}, {sdata.tables['table'].n_obs} spots, "
          f"{sdata.tables['table'].n_vars} genes ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    print(f"Fitting {model!r} on {train}, predicting {predict} ...")
    t0 = time.perf_counter()
    fitted = omx.tl.fit_predict(sdata, train=train, predict=predict, model=model, seed=seed)
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    entry = sdata.tables["table"].uns["omx"]["omx_pred"]
    _print_summary(entry["summary"][predict], f"Held-out section {predict}, mean per-gene scores:")
    scores = omx.get.scores(sdata, "omx_pred", section=predict).set_index("gene")
    best = scores.sort_values("pearson", ascending=False).head(5)
    print("  best genes: " + ", ".join(f"{g} ({r:.2f})" for g, r in zip(best.index, best["pearson"], strict=True)))
    genes = [g for g in DEMO_GENES if g in scores.index][:2] + list(best.index[:2])
    omx.pl.expression(sdata, genes=list(dict.fromkeys(genes)), section=predict, show=False, save=png)
    omx.pl.gene_scores(sdata.tables["table"], key="omx_pred", section=predict, show=False, save=scores_png)
    import matplotlib.pyplot as plt

    plt.close("all")
    fitted.save(model_dir)
    sdata.write(zarr_path)


def _check_store(path: Path) -> None:
    """A `CLIError` naming ``path`` unless it is a folder holding a zarr group."""
    if not path.exists():
        raise CLIError(f"{path} does not exist; expected {STORE}.")
    if not path.is_dir():
        raise CLIError(f"{path} is a file; expected {STORE}.")
    if not any((path / name).is_file() for name in ("zarr.json", ".zgroup")):
        what = "an empty folder" if not any(path.iterdir()) else "a folder without zarr.json or .zgroup"
        raise CLIError(f"{path} is {what}; expected {STORE}.")


def _leftovers(tables: Path, key: str) -> list[Path]:
    """Hidden folders of table ``key`` that an interrupted `omx predict` left in ``tables/`` (see `_write_table`)."""
    pattern = re.compile(rf"\.omx-(tmp|old)-{re.escape(key)}-[0-9a-f]{{8}}")
    return sorted(p for p in tables.glob(".omx-*") if pattern.fullmatch(p.name)) if tables.is_dir() else []


def _check_target(sdata, path: Path, key: str, overwrite: bool) -> bool:
    """Whether ``tables/key`` is to be replaced; a `CLIError` when it may not be.

    Only omx's own prediction table (``uns[Key.TABLE_MARK] == "predictions"``) or a folder that is no readable
    table (the remains of an interrupted write) is replaced, and only with ``overwrite``; any other element of
    that name is never replaced.
    """
    import anndata as ad

    from omx._schema import Key

    for kind in ("images", "labels", "points", "shapes"):
        if key in getattr(sdata, kind):
            raise CLIError(f"{path} already has an element {key!r} ({kind}); pass another --key-added.")
    target = path / "tables" / key
    if key in sdata.tables:
        table, state = sdata.tables[key], "has a table"
    elif target.exists():
        try:
            table, state = ad.io.read_zarr(target), "has an unregistered table"
        except Exception as err:  # noqa: BLE001 -- any failure to read it means it is no usable table
            if not overwrite:
                raise CLIError(
                    f"{target} is not a readable table ({type(err).__name__}: {err}); an interrupted write leaves "
                    "such a folder. Pass --overwrite to replace it, or another --key-added."
                ) from None
            return True
    else:
        return False
    if table.uns.get(Key.TABLE_MARK) != "predictions":
        raise CLIError(
            f"{path} already has a table {key!r} that omx predict did not write; it is never replaced, even with "
            "--overwrite. Pass another --key-added."
        )
    if not overwrite:
        raise CLIError(
            f"{path} already {state} {key!r} written by omx predict; pass --overwrite to replace it, or another "
            "--key-added."
        )
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_table(sdata, path: Path, key: str, table, *, replace: bool) -> None:
    """Write ``table`` as ``tables/key`` of the store so that a failure leaves no element behind.

    The table is written in full under a hidden temporary name (spatialdata's reader skips names starting with a
    dot), then renamed into place; an existing ``tables/key`` (only with ``replace``) is renamed away first and
    deleted last. On an error, what this call wrote is removed and a table renamed away is put back.
    """
    tables = path / "tables"
    token = uuid.uuid4().hex[:8]
    tmp, old = f".omx-tmp-{key}-{token}", tables / f".omx-old-{key}-{token}"
    created = [tables / tmp] if tables.exists() else [tables]
    target = tables / key
    sdata.tables[tmp] = table
    try:
        sdata.write_element(tmp)
        if replace and target.exists():
            target.rename(old)
        os.rename(tables / tmp, target)  # fails where another process wrote `key` meanwhile
    except BaseException:
        for created_path in created:
            _remove(created_path)
        if old.exists() and not target.exists():
            old.rename(target)
        if tmp in (path / "zarr.json").read_text(errors="replace"):
            sdata.write_consolidated_metadata()  # the element was written in full before the failure
        raise
    finally:
        del sdata.tables[tmp]
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()
    _remove(old)


def predict(
    sdata_path: Path,
    model_path: Path,
    shapes_key: str | None,
    key_added: str,
    *,
    table_key: str | None = None,
    overwrite: bool = False,
) -> int:
    """Predict expression for one shapes element of a SpatialData on disk, into a new table element.

    The store, the model and the table to write are checked before any prediction; the table is written under a
    temporary name and renamed into place, so a failed or killed run leaves no element behind.
    """
    import spatialdata as sd
    from spatialdata._core.validation import check_valid_name

    import omx

    _check_store(sdata_path)
    if not (model_path / "params.json").is_file():
        raise CLIError(f"--model {model_path} is not a folder written by `model.save(path)` (no params.json there).")
    try:
        check_valid_name(key_added)
        if key_added.startswith("."):
            raise ValueError("spatialdata's reader skips names that start with a dot.")
    except ValueError as err:
        raise CLIError(f"--key-added {key_added!r} is not a valid element name: {err}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # a bad element is skipped with a warning: a broken `tables/key_added` is dealt with below
            sdata = sd.read_zarr(sdata_path, on_bad_files="warn")
        except Exception as err:  # noqa: BLE001 -- reported in one line, with the error that spatialdata gave
            raise CLIError(f"Could not read {sdata_path} as {STORE}: {type(err).__name__}: {err}") from None
    for w in caught:  # spatialdata's own warnings, less the one about the table this call replaces
        if not str(w.message).startswith(f"tables/{key_added}:"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    replace = _check_target(sdata, sdata_path, key_added, overwrite)
    leftovers = _leftovers(sdata_path / "tables", key_added)
    if leftovers and not overwrite:
        names = ", ".join(p.name for p in leftovers)
        print(f"Note: {sdata_path / 'tables'} holds {names}, left by an interrupted omx predict of {key_added!r}; "
              "--overwrite removes them.", file=sys.stderr)  # fmt: skip
    try:
        model = omx.models.load(model_path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CLIError(f"Could not load the model in {model_path}: {err}") from None
    table = omx.tl.predict_expression(
        sdata, model, shapes_key=shapes_key, table_key=table_key, key_added=key_added, inplace=False
    )
    _write_table(sdata, sdata_path, key_added, table, replace=replace)
    if overwrite:
        for leftover in leftovers:
            _remove(leftover)
    what = "replaced the table" if replace else "the new table"
    print(f"Wrote {table.n_obs} spots x {table.n_vars} genes to {what} {key_added!r} in {sdata_path}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``omx`` command."""
    parser = argparse.ArgumentParser(prog="omx", description="Predict molecular profiles from histology.")
    parser.add_argument(
        "-v",
        "--verbosity",
        default="warning",
        choices=["error", "warning", "info", "debug", "0", "1", "2", "3"],
        help="what omx logs to stderr (omx.settings.verbosity; default: warning, the command prints its own "
        "summary); info adds what is read, chosen and written, debug the details",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="fit and predict on the packaged her2st sample (offline)",
        description="Fit on two sections of the packaged her2st sample, predict the third and write two plots, the "
        "model and the SpatialData into --out. Existing files there are never replaced: the command checks them all "
        "before it starts and stops if any exists.",
    )
    p_demo.add_argument(
        "--out", type=Path, default=Path("omx_demo"), help=f"output folder; must not hold {', '.join(DEMO_FILES)}"
    )
    p_demo.add_argument("--model", default="ridge", choices=["ridge", "cnn"])
    p_demo.add_argument("--seed", type=int, default=0)
    p_pred = sub.add_parser(
        "predict",
        help="predict expression into a SpatialData .zarr with a saved model",
        description="Predict expression for the spots of a SpatialData .zarr store with a model saved by "
        "model.save, into a new table element --key-added. Nothing in the store is changed until the new table is "
        "written in full; a failed or interrupted run leaves the store as it was.",
    )
    p_pred.add_argument("sdata", type=Path, help="SpatialData .zarr store (the folder written by sdata.write)")
    p_pred.add_argument("--model", type=Path, required=True, help="folder written by model.save")
    p_pred.add_argument("--shapes-key", default=None, help="the spots; may be omitted when there is one shapes element")
    p_pred.add_argument(
        "--table-key",
        default=None,
        help="the table annotating the spots (section and patient labels); needed when several tables annotate them",
    )
    p_pred.add_argument("--key-added", default="omx_pred", help="name of the new table (default: omx_pred)")
    p_pred.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a table --key-added that omx predict wrote, or the remains of an interrupted write; a table "
        "that omx did not write is never replaced",
    )
    sub.add_parser("bench", help="run benchmarks/her2st.py (needs the her2st data)")
    args = parser.parse_args(argv)
    from omx._settings import settings

    # omx's own logger only, and only for this command: the root logger and other libraries' logging are left as
    # they are
    with settings.override(verbosity=args.verbosity), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")  # zarr's notice on every write, not ours
        try:
            return _run(args)
        except CLIError as err:
            print(f"omx {args.command}: error: {err}", file=sys.stderr)
            return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo(args.out, model=args.model, seed=args.seed)
    if args.command == "predict":
        return predict(
            args.sdata,
            args.model,
            args.shapes_key,
            args.key_added,
            table_key=args.table_key,
            overwrite=args.overwrite,
        )
    if args.command == "bench":
        script = Path(__file__).resolve().parents[2] / "benchmarks" / "her2st.py"
        if not script.exists():
            print("benchmarks/her2st.py is part of the source tree; run it from a checkout of omx.", file=sys.stderr)
            return 2
        import runpy

        runpy.run_path(str(script), run_name="__main__")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
