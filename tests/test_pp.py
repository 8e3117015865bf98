import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from anndata import AnnData
from shapely.geometry import Point
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import omx


def _sdata(mpp=0.5, h=400, w=600, centers_um=((50, 50), (100, 150), (290, 190)), radius=25.0, scale_factors=None):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        scale_factors=scale_factors,
        transformations={"S": Scale([mpp, mpp], axes=("y", "x"))},
    )
    gdf = gpd.GeoDataFrame(geometry=[Point(x, y) for x, y in centers_um])
    gdf["radius"] = radius
    shapes = ShapesModel.parse(gdf, transformations={"S": Identity()})
    n = len(centers_um)
    adata = AnnData(np.ones((n, 2), dtype=np.float32), obs=pd.DataFrame({"region": "spots", "spot_id": np.arange(n)}))
    adata.obs.index = adata.obs.index.astype(str)
    adata.obs["region"] = adata.obs["region"].astype("category")
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    return sd.SpatialData(
        images={"he": image}, shapes={"spots": shapes}, tables={"table": table}, attrs={"omx": {"units": {"S": "um"}}}
    ), img


def test_resolve_spots_microns():
    sdata, _ = _sdata()
    spots = omx.pp.resolve_spots(sdata)
    assert spots.image_key == "he" and spots.shapes_key == "spots" and spots.table_key == "table"
    assert spots.mpp == pytest.approx(0.5)
    np.testing.assert_allclose(spots.centers[1], [200, 300])
    np.testing.assert_allclose(spots.radius_px, 50)
    assert spots.diameter_um == pytest.approx(50)
    np.testing.assert_array_equal(spots.table_rows, [0, 1, 2])


def test_patches_native_resolution_match_slices():
    sdata, img = _sdata()
    # 50 um at 0.5 um/px: 100 px, no resampling; centre (200, 300) -> rows 250:350, cols 150:250
    patches = omx.pp.extract_patches(sdata, size_um=50, size_px=100)
    assert patches.shape == (3, 100, 100, 3) and patches.dtype == np.uint8
    np.testing.assert_array_equal(patches[1], img[:, 250:350, 150:250].transpose(1, 2, 0))


def test_patches_resampled_keep_centre_and_pad_edges():
    sdata, img = _sdata(scale_factors=[2])
    full = omx.pp.extract_patches(sdata, size_um=50, size_px=100)
    half = omx.pp.extract_patches(sdata, size_um=50, size_px=50)  # 1 um/px: read from the 2x level
    ref = full[1].reshape(50, 2, 50, 2, 3).mean(axis=(1, 3))
    assert np.abs(half[1].astype(float) - ref).mean() < 3
    # spot (290, 190) um = (580, 380) px: a 100 px patch reaches past the right and bottom edges
    edge = omx.pp.extract_patches(sdata, size_um=50, size_px=100)[2]
    assert (edge[70:, :] == 255).all() and (edge[:, 70:] == 255).all()
    np.testing.assert_array_equal(edge[:70, :70], img[:, 330:400, 530:600].transpose(1, 2, 0))


def test_iter_patches_batches_cover_all_spots_once():
    centers = [(x, y) for x in range(20, 290, 30) for y in range(20, 190, 30)]
    sdata, _ = _sdata(centers_um=centers)
    seen = []
    for idx, patches in omx.pp.iter_patches(sdata, size_px=32, batch_size=7, tile_px=64):
        assert len(idx) == len(patches) <= 7
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(centers)))
    whole = omx.pp.extract_patches(sdata, size_px=32)
    for idx, patches in omx.pp.iter_patches(sdata, size_px=32, batch_size=5):
        np.testing.assert_array_equal(whole[idx], patches)


def test_spots_outside_image_named():
    sdata, _ = _sdata(centers_um=((50, 50), (1000, 50)))
    with pytest.raises(ValueError, match=r"1 of 2 spots .* outside image"):
        omx.pp.resolve_spots(sdata)


def test_mpp_required_without_micron_units():
    sdata, _ = _sdata()
    sdata.attrs.clear()
    with pytest.raises(ValueError, match="mpp="):
        omx.pp.resolve_spots(sdata)
    assert omx.pp.resolve_spots(sdata, spot_diameter_um=100).mpp == pytest.approx(1.0)
    assert omx.pp.resolve_spots(sdata, mpp=0.25).mpp == 0.25


def test_missing_and_ambiguous_keys():
    sdata, _ = _sdata()
    with pytest.raises(KeyError, match="image_key="):
        omx.pp.resolve_spots(sdata, image_key="nope")
    sdata.images["he2"] = sdata.images["he"]
    with pytest.raises(KeyError, match="Ambiguous image"):
        omx.pp.resolve_spots(sdata)
    assert omx.pp.resolve_spots(sdata, image_key="he2").image_key == "he2"


def test_table_not_annotating_shapes():
    sdata, _ = _sdata()
    sdata.shapes["other"] = sdata.shapes["spots"]
    with pytest.raises(ValueError, match="does not annotate shapes 'other'"):
        omx.pp.resolve_spots(sdata, shapes_key="other", table_key="table")


def test_non_rgb_image_rejected_and_float_converted():
    sdata, img = _sdata()
    grey = Image2DModel.parse(img[:1], dims=("c", "y", "x"), transformations={"S": Scale([0.5, 0.5], axes=("y", "x"))})
    sdata.images["grey"] = grey
    with pytest.raises(ValueError, match="1 channel"):
        omx.pp.resolve_spots(sdata, image_key="grey")
    flt = Image2DModel.parse(
        img.astype(np.float32) / 255, dims=("c", "y", "x"), transformations={"S": Scale([0.5, 0.5], axes=("y", "x"))}
    )
    sdata.images["float"] = flt
    p = omx.pp.extract_patches(sdata, image_key="float", size_um=50, size_px=100)
    assert p.dtype == np.uint8
    assert np.abs(p[1].astype(int) - img[:, 250:350, 150:250].transpose(1, 2, 0)).max() <= 1


def test_missing_and_ambiguous_shapes_and_tables():
    sdata, _ = _sdata()
    with pytest.raises(KeyError, match="There is no table 'nope'"):
        omx.pp.resolve_spots(sdata, table_key="nope")
    with pytest.raises(KeyError, match="There is no shapes element 'nope'"):
        omx.pp.resolve_spots(sdata, shapes_key="nope")
    del sdata.tables["table"]
    sdata.shapes["more"] = sdata.shapes["spots"]
    with pytest.raises(KeyError, match="Ambiguous shapes element.*shapes_key="):
        omx.pp.resolve_spots(sdata)
    spots = omx.pp.resolve_spots(sdata, shapes_key="more")
    assert spots.table_key is None and (spots.table_rows == -1).all()
