"""Accuracy, time and memory of every omx model on the her2st sections (no leakage).

    python benchmarks/her2st.py                 # all models, both splits
    python benchmarks/her2st.py --models ridge  # one model
    python benchmarks/her2st.py --models ridge graph --encoder uni --weights weights/MahmoodLab/UNI/pytorch_model.bin

With ``--encoder`` the feature models (ridge, graph, contrastive) use that encoder (a registered foundation model,
``timm:<arch>`` or ``hf-hub:<org>/<name>``, with ``--weights``) instead of the handcrafted features, at its native
resolution; each section is encoded once (``omx.pp.encode``) and every fold reuses the features.

Splits: leave-one-section-out over C2, C3, C4 and B4 (each fold fits genes' normalisation and the model on
the other three sections only), and cross-patient (train C2, C3, C4; test B4). Genes: the 785-gene panel
of the published methods. Scores: mean per-gene Pearson r over the panel, over the 50 most expressed genes
of the test section, and over the 50 most variable genes of the training sections.

Each model runs in its own process so that its peak memory (max RSS) is its own.
Data: Andersson et al., Nat Commun 12, 6012 (2021), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

SECTIONS = ["C2", "C3", "C4", "B4"]
MODELS = {
    "ridge": {"model": "ridge"},  # handcrafted features of the spot and its surroundings (x2, x3)
    "ridge_spot": {"model": "ridge", "context": (1.0,)},  # the spot's patch alone
    "cnn": {"model": "cnn"},
    # MLP towers on the same features; retrieval, regression head and linear part stacked by cross-fitting;
    # spot context (attention over, and propagation across, the 6 nearest spots)
    "contrastive": {"model": "contrastive"},
    "contrastive_no_context": {"model": "contrastive", "params": {"neighbors": 0}},
    "graph": {"model": "graph"},  # GraphRidge: ridge on the same features, then 2 rounds of propagation (6-NN graph)
}


def run_one(name: str, seed: int, encoder: str | None = None, weights: str | None = None) -> list[dict]:
    import pandas as pd

    import omx

    spec = dict(MODELS[name])
    params = spec.pop("params", None) or {}
    t = time.perf_counter()
    sdata = omx.datasets.her2st(sections=SECTIONS)
    genes = omx.datasets.her2st_genes()
    load_s = time.perf_counter() - t
    encode_s = 0.0
    if encoder is not None and spec["model"] != "cnn":
        params["encoder"] = omx.encoders.get_encoder(encoder, weights=weights)
        t = time.perf_counter()
        for section in SECTIONS:  # once; every fold and split reuses obsm["X_omx_<encoder>"]
            omx.pp.encode(sdata, params["encoder"], shapes_key=f"{section}_spots", image_key=f"{section}_he")
        encode_s = time.perf_counter() - t
    if params:  # a model with other than its default parameters
        spec["model"] = omx.models.get_model(spec["model"], seed=seed, **params)
    rows = []
    for split, kwargs in (
        ("leave-one-section-out", {"groups": "section"}),
        ("cross-patient", {"groups": "patient", "test": ["B"]}),
    ):
        t = time.perf_counter()
        res = omx.tl.cross_validate(
            sdata, genes=genes, seed=seed, key_added=None, show_progress_bar=False, **spec, **kwargs,
        )  # fmt: skip
        res["split"] = split
        res["total_s"] = time.perf_counter() - t
        rows.append(res)
    out = pd.concat(rows)
    out["model"] = name if encoder is None else f"{name}[{encoder}]"
    out["load_s"] = load_s
    out["encode_s"] = encode_s
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out.to_dict(orient="records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", help="append each model's records to this file as soon as the model is done")
    parser.add_argument("--encoder", help="encoder of the feature models (default: handcrafted)")
    parser.add_argument("--weights", help="weight file or folder of --encoder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(args.worker, args.seed, args.encoder, args.weights)))
        return
    import pandas as pd

    records = []
    for name in args.models:
        extra = [f"--{k}={v}" for k in ("encoder", "weights") if (v := getattr(args, k))]
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--seed", str(args.seed), *extra],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"model {name} failed")
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        records.extend(done)
        if args.jsonl:  # a long run interrupted later keeps the models it finished
            with open(args.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in done)
    df = pd.DataFrame(records)
    cols = ["pearson_all", "pearson_top_expressed", "pearson_top_variable"]
    pd.set_option("display.width", 200)
    print("\nPer fold (mean Pearson r per gene; seconds; peak RSS of the model's process):")
    print(df[["model", "split", "section", *cols, "fit_s", "predict_s", "peak_rss_gb"]].round(3).to_string(index=False))
    loso = df[df.split == "leave-one-section-out"]
    print("\nLeave-one-section-out, mean over held-out C sections:")
    print(loso[loso.section.str.startswith("C")].groupby("model")[cols + ["fit_s"]].mean().round(3).to_string())
    print("\nLeave-one-section-out, mean over all four sections:")
    print(loso.groupby("model")[cols].mean().round(3).to_string())
    print("\nSeconds per split, patch extraction and encoding included (data loading excluded):")
    print(df.groupby(["model", "split"])["total_s"].first().round(1).to_string())
    print("\nCross-patient (train C2, C3, C4; test B4):")
    print(df[df.split == "cross-patient"].set_index("model")[cols + ["fit_s", "predict_s"]].round(3).to_string())


if __name__ == "__main__":
    main()
