import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from shapely import points
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Scale

from omx.datasets._her2st import _find_her2st_dir

# shared test data modules (tests/deconv_data.py) are imported by name
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch sees none")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def her2st_dir():
    """The her2st study folder (../shared/data/her2st or $OMX_HER2ST_DIR); real-data tests skip without it."""
    try:
        root = _find_her2st_dir()
    except FileNotFoundError as err:
        pytest.skip(f"her2st data not usable: {err}")
    if root is None:
        pytest.skip("her2st data not found (../shared/data/her2st or $OMX_HER2ST_DIR); real-data tests skipped.")
    return root


_OD_H = np.array([0.65, 0.70, 0.29])  # hematoxylin optical density per unit stain (R, G, B)
_OD_E = np.array([0.07, 0.99, 0.11])  # eosin


def synthetic_he(size=400, n_nuclei=120, mpp=0.5, seed=0, n_touching=10):
    """An H&E-like image: pink stroma with dark purple elliptic nuclei, some in touching pairs.

    Returns ``(image (y, x, 3) uint8, centres (n, 2) as (x, y))``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    hem = np.zeros((size, size))
    centres = []
    r_mean = 3.5 / mpp  # nucleus radius ~3.5 um

    def free(c, margin):
        return all(np.hypot(*(c - np.asarray(o))) > margin for o in centres)

    tries = 0
    while len(centres) < n_nuclei - 2 * n_touching and tries < 10000:
        tries += 1
        c = rng.uniform(r_mean * 2, size - r_mean * 2, 2)
        if free(c, 3.2 * r_mean):
            centres.append(tuple(c))
    for _ in range(n_touching):  # pairs of nuclei whose edges touch
        for _ in range(1000):
            c = rng.uniform(r_mean * 3, size - r_mean * 3, 2)
            ang = rng.uniform(0, np.pi)
            d = 1.8 * r_mean * np.array([np.cos(ang), np.sin(ang)])
            if free(c, 4.5 * r_mean):
                centres.extend([tuple(c - d / 2), tuple(c + d / 2)])
                break
    for cx, cy in centres:
        a, b = r_mean * rng.uniform(0.9, 1.2), r_mean * rng.uniform(0.7, 0.95)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        hem[inside] = np.maximum(hem[inside], rng.uniform(0.8, 1.1))
    eos = 0.35 + 0.1 * rng.random((size, size))
    od = hem[..., None] * _OD_H + eos[..., None] * _OD_E + rng.normal(0, 0.02, (size, size, 3))
    rgb = np.clip(255 * np.exp(-np.clip(od, 0, None)), 0, 255).astype(np.uint8)
    return rgb, np.asarray(centres)[:, ::-1][:, ::-1]


def _synthetic_sdata(size=400, n_nuclei=120, mpp=0.5, seed=0, spots=True):
    """A SpatialData with the synthetic image (in microns) and, optionally, a 3 x 3 grid of spots with a table."""
    rgb, centres = synthetic_he(size=size, n_nuclei=n_nuclei, mpp=mpp, seed=seed)
    img = Image2DModel.parse(
        rgb.transpose(2, 0, 1), dims=("c", "y", "x"), transformations={"global": Scale([mpp, mpp], axes=("y", "x"))}
    )
    elements = {"images": {"he": img}}
    tables = {}
    if spots:
        side = size * mpp
        g = np.linspace(side / 6, side * 5 / 6, 3)
        xy = np.array([(x, y) for y in g for x in g])
        gdf = gpd.GeoDataFrame({"radius": np.full(len(xy), side / 7)}, geometry=points(xy), index=np.arange(len(xy)))
        elements["shapes"] = {
            "spots": ShapesModel.parse(gdf, transformations={"global": Scale([1, 1], axes=("y", "x"))})
        }
        obs = pd.DataFrame({"region": "spots", "spot_id": np.arange(len(xy)), "section": "S1"})
        obs.index = obs.index.astype(str)
        obs["region"] = obs["region"].astype("category")
        tables["table"] = TableModel.parse(
            AnnData(X=np.ones((len(xy), 3), np.float32), obs=obs),
            region="spots",
            region_key="region",
            instance_key="spot_id",
        )
    sdata = SpatialData(**elements, tables=tables)
    sdata.attrs["omx"] = {"units": {"global": "um"}}
    return sdata, centres


@pytest.fixture
def synthetic_sdata():
    """Factory of synthetic H&E SpatialData objects with known nuclei (see `_synthetic_sdata`)."""
    return _synthetic_sdata


def write_hest_folder(root, sdata, section, ids=("S1", "S2"), *, genes=None, patients=None, n_levels=3):
    """Write ``section`` of an omx-layout SpatialData as HEST-1k samples ``ids`` in a folder in HEST's layout.

    ``root/st/<id>.h5ad`` (counts as float32 in a csr ``X``, as HEST stores them; ``obsm["spatial"]`` and
    ``obs["pxl_col_in_fullres"]`` / ``["pxl_row_in_fullres"]`` in pixels of the WSI; ``in_tissue``, ``array_row``,
    ``array_col``), ``root/wsis/<id>.tif`` (the level-0 image as a tiled TIFF with ``n_levels`` levels as reduced
    pages, as pyvips writes HEST's), ``root/metadata/<id>.json`` and ``root/HEST_v1_1_0.csv``. ``genes`` maps an id
    to the genes its h5ad keeps; ``patients`` maps an id to its patient (default ``"P_<id>"``).

    Returns a dict with what was written: ``mpp``, ``image`` (y, x, 3), ``centres_um`` (n, 2), ``counts`` (csr),
    ``genes`` and ``paths`` (``{id: {"h5ad": ..., "wsi": ..., "json": ...}}``, and ``"csv"``).
    """
    import json
    from pathlib import Path

    import spatialdata as sd
    import tifffile
    from scipy import sparse

    root = Path(root)
    img = sd.get_pyramid_levels(sdata.images[f"{section}_he"], n=0)
    image = np.ascontiguousarray(img.values.transpose(1, 2, 0))
    affine = sd.transformations.get_transformation(
        sdata.images[f"{section}_he"], to_coordinate_system=section
    ).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    mpp = float(affine[0, 0])
    table = sdata.tables["table"]
    rows = table[(table.obs["section"] == section).to_numpy()]
    centres_um = np.asarray(rows.obsm["spatial"], dtype=np.float64)
    centres_px = centres_um / mpp
    counts = sparse.csr_matrix(rows.X)
    all_genes = [str(g) for g in rows.var_names]
    h, w = image.shape[:2]
    paths, csv_rows = {}, []
    for d in ("st", "wsis", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for sample in ids:
        keep = list(genes[sample]) if genes and sample in genes else all_genes
        cols = [all_genes.index(g) for g in keep]
        obs = pd.DataFrame(
            {
                "in_tissue": 1,
                "pxl_col_in_fullres": centres_px[:, 0],
                "pxl_row_in_fullres": centres_px[:, 1],
                "array_col": rows.obs["array_x"].to_numpy(),
                "array_row": rows.obs["array_y"].to_numpy(),
            },
            index=[f"{x}x{y}" for x, y in zip(rows.obs["array_x"], rows.obs["array_y"], strict=True)],
        )
        adata = AnnData(X=counts[:, cols].astype(np.float32), obs=obs, var=pd.DataFrame(index=keep))
        adata.obsm["spatial"] = centres_px.copy()
        h5ad = root / "st" / f"{sample}.h5ad"
        adata.write_h5ad(h5ad)
        wsi = root / "wsis" / f"{sample}.tif"
        with tifffile.TiffWriter(wsi) as tw:
            opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
            tw.write(image, **opts)
            for level in range(1, n_levels):
                tw.write(image[:: 2**level, :: 2**level], subfiletype=1, **opts)
        meta = {
            "pixel_size_um_estimated": mpp,
            "pixel_size_um_embedded": None,
            "spot_diameter": 100.0,
            "inter_spot_dist": 200.0,
            "st_technology": "Spatial Transcriptomics",
            "magnification": "10x",
            "fullres_px_width": w,
            "fullres_px_height": h,
        }
        js = root / "metadata" / f"{sample}.json"
        js.write_text(json.dumps(meta))
        paths[sample] = {"h5ad": h5ad, "wsi": wsi, "json": js}
        patient = (patients or {}).get(sample, f"P_{sample}")
        csv_rows.append({"id": sample, "patient": patient, "organ": "Breast", "species": "Homo sapiens", **meta})
    paths["csv"] = root / "HEST_v1_1_0.csv"
    pd.DataFrame(csv_rows).to_csv(paths["csv"], index=False)
    return {"mpp": mpp, "image": image, "centres_um": centres_um, "counts": counts, "genes": all_genes, "paths": paths}


@pytest.fixture
def hest_folder():
    """Writer of HEST-1k-layout folders from an omx-layout SpatialData (see `write_hest_folder`)."""
    return write_hest_folder
