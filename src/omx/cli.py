"""Command line: ``omx demo``, ``omx predict``, ``omx bench``."""

from __future__ import annotations

import argparse
import sys
import time
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


def demo(out: Path, model: str = "ridge", seed: int = 0) -> int:
    """Fit on two sections of the packaged her2st sample, predict the third, report scores, write files."""
    import matplotlib

    matplotlib.use("Agg")
    import omx

    out.mkdir(parents=True, exist_ok=True)
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
    png = out / "observed_vs_predicted.png"
    omx.pl.expression(sdata, genes=list(dict.fromkeys(genes)), section=predict, show=False, save=png)
    omx.pl.gene_scores(sdata.tables["table"], key="omx_pred", section=predict, show=False, save=out / "gene_scores.png")
    import matplotlib.pyplot as plt

    plt.close("all")
    model_dir = out / "model"
    fitted.save(model_dir)
    zarr_path = out / "her2st_sample_pred.zarr"
    if zarr_path.exists():
        print(f"{zarr_path} exists; not overwriting it (delete it to write a new one).")
    else:
        sdata.write(zarr_path)
    print(f"Wrote {png}, {out / 'gene_scores.png'}, the model to {model_dir} and the SpatialData to {zarr_path}.")
    return 0


def predict(sdata_path: Path, model_path: Path, shapes_key: str | None, key_added: str) -> int:
    """Predict expression for one shapes element of a SpatialData on disk, into a new table element."""
    import spatialdata as sd

    import omx

    sdata = sd.read_zarr(sdata_path)
    if key_added in sdata.tables:
        print(f"{sdata_path} already has a table {key_added!r}; pass another --key-added.", file=sys.stderr)
        return 2
    table = omx.tl.predict_expression(sdata, str(model_path), shapes_key=shapes_key, key_added=key_added, inplace=False)
    sdata.tables[key_added] = table
    sdata.write_element(key_added)  # a new element: nothing on disk is changed or removed
    print(f"Wrote {table.n_obs} spots x {table.n_vars} genes to the new table {key_added!r} in {sdata_path}.")
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
    p_demo = sub.add_parser("demo", help="fit and predict on the packaged her2st sample (offline)")
    p_demo.add_argument("--out", type=Path, default=Path("omx_demo"), help="output folder")
    p_demo.add_argument("--model", default="ridge", choices=["ridge", "cnn"])
    p_demo.add_argument("--seed", type=int, default=0)
    p_pred = sub.add_parser("predict", help="predict expression into a SpatialData .zarr with a saved model")
    p_pred.add_argument("sdata", type=Path, help="SpatialData .zarr")
    p_pred.add_argument("--model", type=Path, required=True, help="folder written by model.save")
    p_pred.add_argument("--shapes-key", default=None)
    p_pred.add_argument("--key-added", default="omx_pred")
    sub.add_parser("bench", help="run benchmarks/her2st.py (needs the her2st data)")
    args = parser.parse_args(argv)
    from omx._settings import settings

    # omx's own logger only, and only for this command: the root logger and other libraries' logging are left as
    # they are
    with settings.override(verbosity=args.verbosity), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")  # zarr's notice on every write, not ours
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo(args.out, model=args.model, seed=args.seed)
    if args.command == "predict":
        return predict(args.sdata, args.model, args.shapes_key, args.key_added)
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
