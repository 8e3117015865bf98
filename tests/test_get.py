"""omx.get and the results schema: one writer, one layout, results ready for scanpy."""

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import spatialdata as sd
from anndata import AnnData

import omx
from omx._schema import Key, check_free, fill_column, owned, scores_columns, scores_frame, write_results


@pytest.fixture
def sdata():
    return omx.datasets.toy_sdata(n_spots=200, n_genes=30, n_sections=2, seed=0)


@pytest.fixture
def fitted(sdata):
    model = omx.tl.fit_predict(sdata, train="S1", predict="S2", show_progress_bar=False)
    return sdata, model


def test_predictions_hold_only_predicted_spots_and_genes(fitted):
    sdata, model = fitted
    table = sdata.tables["table"]
    adata = omx.get.predictions(sdata)
    s2 = (table.obs["section"] == "S2").to_numpy()
    genes = model.meta_["genes"]
    assert adata.shape == (int(s2.sum()), len(genes))
    assert list(adata.var_names) == genes and list(adata.obs_names) == list(table.obs_names[s2])
    assert np.isfinite(adata.X).all() and (adata.X >= 0).all()
    cols = table.var_names.get_indexer(genes)
    np.testing.assert_allclose(adata.X, np.maximum(table.layers["omx_pred"][np.ix_(s2, cols)], 0))
    np.testing.assert_allclose(adata.obsm["spatial"], table.obsm["spatial"][s2, :2])
    # per-gene scores in var equal the stored long table
    long = omx.get.scores(sdata)
    assert set(long.columns) >= {"section", "gene", "pearson", "spearman", "mse", "ccc"}
    assert (long["section"] == "S2").all() and len(long) == len(genes)
    np.testing.assert_allclose(adata.var["pearson"], long.set_index("gene").loc[genes, "pearson"])
    # observed expression on the same scale, for comparison
    from omx._utils import log_normalize

    np.testing.assert_allclose(adata.layers["observed"], log_normalize(table.X[s2], columns=cols), rtol=1e-6)
    assert adata.uns["omx"]["omx_pred"]["model"]["class"] == "Ridge"


def test_predictions_work_in_scanpy(fitted):
    sdata, _ = fitted
    adata = omx.get.predictions(sdata)
    sc.pp.pca(adata, n_comps=5)
    sc.pp.neighbors(adata, n_neighbors=10)
    sc.tl.leiden(adata, resolution=0.5, flavor="igraph", n_iterations=2, directed=False)
    sc.tl.rank_genes_groups(adata, "leiden", method="t-test")
    fold_changes = pd.DataFrame(adata.uns["rank_genes_groups"]["logfoldchanges"].tolist())
    assert np.isfinite(fold_changes.to_numpy()).all()  # predictions are never negative: no NaN fold changes


def test_predictions_of_he_only_section(sdata):
    # S2's spots without their table rows: an H&E-only section
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    sub = table[(table.obs["section"] == "S1").to_numpy()].copy()
    sub.obs[attrs["region_key"]] = pd.Categorical(["S1_spots"] * sub.n_obs)
    del sub.uns["spatialdata_attrs"]
    sdata.tables["table"] = sd.models.TableModel.parse(
        sub, region="S1_spots", region_key=attrs["region_key"], instance_key=attrs["instance_key"]
    )
    omx.tl.fit_predict(sdata, train="S1", predict="S2_spots", show_progress_bar=False)
    adata = omx.get.predictions(sdata)
    assert adata.n_obs == len(sdata.shapes["S2_spots"]) and "observed" not in adata.layers
    assert (adata.obs["omx_source"] == "sdata.tables['omx_pred']").all()
    with pytest.raises(KeyError, match="no per-gene scores"):
        omx.get.scores(sdata)


def test_cross_validate_scores_share_the_layout(sdata):
    res = omx.tl.cross_validate(sdata, show_progress_bar=False)
    long = omx.get.scores(sdata, "omx_cv")
    assert sorted(long["section"].unique()) == ["S1", "S2"] and set(long["fold"]) == {"S1", "S2"}
    by_section = long.groupby("section")["pearson"].mean()
    np.testing.assert_allclose(by_section.loc[res["section"]].to_numpy(), res["pearson_all"].to_numpy(), rtol=1e-6)
    adata = omx.get.predictions(sdata, "omx_cv")
    assert adata.n_obs == sdata.tables["table"].n_obs  # every spot predicted out of fold
    assert (adata.var["n_sections_scored"] == 2).all()
    assert len(omx.get.scores(sdata, "omx_cv", section="S1")) == long["section"].eq("S1").sum()


def test_getters_name_what_is_there(fitted):
    sdata, _ = fitted
    with pytest.raises(KeyError, match="No omx result 'nope'.*omx_pred"):
        omx.get.predictions(sdata, "nope")
    with pytest.raises(KeyError, match=r"Sections \['S9'\]"):
        omx.get.predictions(sdata, section="S9")
    with pytest.raises(TypeError, match="SpatialData object or an AnnData"):
        omx.get.scores(np.zeros(3))


def test_proportions_tidy_and_wide():
    table = AnnData(np.zeros((3, 2)), obs=pd.DataFrame({"section": ["A", "A", "B"]}, index=["s0", "s1", "s2"]))
    props = pd.DataFrame([[0.2, 0.8], [0.5, 0.5], [np.nan, np.nan]], index=table.obs_names, columns=["T", "B"])
    q05, q95 = props - 0.1, props + 0.1
    write_results(
        table, key="omx_proportions", entry={"function": "deconvolve"}, overwrite=False, where="t",
        obsm={"omx_proportions": props, "omx_proportions_q05": q05, "omx_proportions_q95": q95},
    )  # fmt: skip
    long = omx.get.proportions(table)
    assert list(long.columns) == ["spot", "section", "cell_type", "proportion", "q05", "q95"]
    assert len(long) == 4 and set(long["spot"]) == {"s0", "s1"}  # the spot without proportions is left out
    row = long[(long.spot == "s0") & (long.cell_type == "B")].iloc[0]
    assert row.proportion == 0.8 and row.q05 == pytest.approx(0.7) and row.section == "A"
    wide = omx.get.proportions(table, wide=True)
    assert list(wide.columns) == ["section", "T", "B"] and wide.shape == (2, 3)


def test_writer_checks_every_key_before_writing():
    table = AnnData(np.zeros((4, 3)))
    table.obs["omx_cell_type"] = ["mine"] * 4  # a user's column with omx's name
    layer = np.ones((4, 3), np.float32)
    with pytest.raises(KeyError, match=r"obs\['omx_cell_type'\]"):
        write_results(
            table, key="omx_proportions", entry={}, overwrite=False, where="t",
            layers={"omx_proportions_x": layer}, obs={"omx_cell_type": ["x"] * 4},
        )  # fmt: skip
    assert "omx_proportions_x" not in table.layers and "omx" not in table.uns  # nothing written at all
    assert (table.obs["omx_cell_type"] == "mine").all()
    write_results(
        table, key="k", entry={"function": "f"}, overwrite=False, where="t", layers={"k": layer}, obs={"k_c": [1] * 4}
    )
    assert owned(table) == {"layers/k", "obs/k_c"}
    with pytest.raises(KeyError, match=r"uns\['omx'\]\['k'\].*layers\['k'\]"):
        check_free(table, key="k", overwrite=False, where="t", layers=["k"])
    check_free(table, key="k", overwrite=True, where="t", layers=["k"])
    with pytest.raises(ValueError, match="shape"):
        write_results(table, key="j", entry={}, overwrite=False, where="t", layers={"j": np.ones((2, 2))})


def test_fill_column_keeps_other_rows_and_refuses_a_users_column():
    table = AnnData(np.zeros((4, 1)))
    fill_column(
        table, Key.N_NUCLEI, np.array([0, 1]), np.array([3, 4]), key="img1", entry={}, overwrite=False, where="t"
    )
    fill_column(table, Key.N_NUCLEI, np.array([2]), np.array([5]), key="img2", entry={}, overwrite=False, where="t")
    np.testing.assert_array_equal(table.obs[Key.N_NUCLEI].to_numpy()[:3], [3, 4, 5])
    assert np.isnan(table.obs[Key.N_NUCLEI].iloc[3])
    other = AnnData(np.zeros((2, 1)))
    other.obs["counted"] = [1.0, 2.0]
    with pytest.raises(KeyError, match="not written by omx"):
        fill_column(other, "counted", np.array([0]), np.array([9]), key="x", entry={}, overwrite=False, where="t")
    assert other.obs["counted"].tolist() == [1.0, 2.0]


def test_scores_layout_round_trip():
    genes = pd.Index(["a", "b"], name="gene")
    s1 = pd.DataFrame({"pearson": [0.1, 0.2], "mse": [1.0, 2.0]}, index=genes)
    s2 = pd.DataFrame({"pearson": [0.3, 0.4], "mse": [3.0, 4.0]}, index=genes)
    stored = scores_columns({"S1": s1, "S2": s2}, fold={"S1": "P1", "S2": "P2"})
    frame = scores_frame({"scores": stored})
    assert list(frame.columns) == ["section", "fold", "gene", "pearson", "mse"]  # a fixed order
    assert frame["pearson"].tolist() == [0.1, 0.2, 0.3, 0.4] and frame["fold"].tolist() == ["P1", "P1", "P2", "P2"]


def test_results_survive_zarr(fitted, tmp_path):
    sdata, _ = fitted
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    a, b = omx.get.predictions(sdata), omx.get.predictions(back)
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(omx.get.scores(sdata), omx.get.scores(back), check_dtype=False)
