"""Simulated deconvolution data shared by test modules (imported by name: conftest puts tests/ on sys.path)."""

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata.models import TableModel

import omx


def simulate(n_spots=300, n_types=5, n_genes=200, n_ref=500, seed=0):
    """Reference cells and spots summed from 5-15 cells with known proportions, with a platform effect."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0, 1.0, n_genes)
    lfc = rng.normal(0, 1.2, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.3)
    mean = base * np.exp(lfc)
    mean = mean / mean.sum(1, keepdims=True) * 1500
    types = [f"t{k}" for k in range(n_types)]
    lab = rng.integers(0, n_types, n_ref)
    ref = AnnData(X=rng.negative_binomial(5, 5 / (5 + mean[lab])).astype(np.float32))
    ref.obs["cell_type"] = pd.Categorical([types[k] for k in lab])
    ref.var_names = [f"g{i}" for i in range(n_genes)]
    n_cells = rng.integers(5, 16, n_spots)
    props = rng.dirichlet(np.full(n_types, 0.5), n_spots)
    platform = rng.lognormal(0, 0.5, n_genes)
    truth, Y = np.zeros((n_spots, n_types)), np.zeros((n_spots, n_genes))
    for s in range(n_spots):
        c = rng.choice(n_types, n_cells[s], p=props[s])
        truth[s] = np.bincount(c, minlength=n_types) / n_cells[s]
        mu = mean[c].sum(0) * platform * 0.1
        Y[s] = rng.negative_binomial(5, 5 / (5 + mu))
    return ref, Y, truth, types, n_cells


def spot_sdata(synthetic_sdata, seed=0):
    """The synthetic H&E with 9 spots whose table holds simulated counts; nuclei segmented."""
    sdata, _ = synthetic_sdata(seed=seed)
    ref, Y, truth, types, _ = simulate(n_spots=9, seed=seed)
    old = sdata.tables["table"]
    obs = old.obs.copy()
    adata = AnnData(X=Y.astype(np.float32), obs=obs, var=pd.DataFrame(index=ref.var_names))
    adata.obsm["spatial"] = np.c_[sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y]
    del sdata.tables["table"]
    sdata.tables["table"] = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    return sdata, ref, truth, types
