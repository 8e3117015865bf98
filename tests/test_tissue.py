"""Tissue detection and tile grids: known tissue on synthetic slides, the real sample, lattice counts, round trips."""

import numpy as np
import pytest
import shapely
import spatialdata as sd
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation, get_transformation

import omx

_OD_H = np.array([0.65, 0.70, 0.29])  # hematoxylin optical density per unit stain (R, G, B)
_OD_E = np.array([0.07, 0.99, 0.11])  # eosin


def slide(h=600, w=800, seed=0, tissue=True):
    """A synthetic slide at 2 um/px: glass with a dark disc, a pale rectangle, a speck and a ring.

    Returns the ``(y, x, 3)`` uint8 image and a dict of the parts' geometry in pixels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    hem, eos = np.zeros((h, w)), np.zeros((h, w))
    parts = {
        "dark": (200, 250, 110),  # disc: centre x, y, radius (px)
        "pale": (420, 80, 760, 260),  # rectangle x0, y0, x1, y1
        "speck": (700, 500, 12),  # a 24 x 24 px square (48 x 48 um, 0.0023 mm^2)
        "ring": (560, 440, 120),  # disc of radius 120 px ...
        "small_hole": (520, 440, 8),  # ... with a small hole (0.0008 mm^2) ...
        "big_hole": (600, 440, 55),  # ... and a bigger one (0.038 mm^2): both filled by default
    }
    if tissue:
        cx, cy, r = parts["dark"]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        hem[disc], eos[disc] = 0.9 + 0.3 * rng.random(disc.sum()), 0.5
        x0, y0, x1, y1 = parts["pale"]
        eos[y0:y1, x0:x1] = 0.12  # a faint eosin pink: (236, 226, 243)-ish
        cx, cy, r = parts["speck"]
        hem[cy - r : cy + r, cx - r : cx + r] = 1.0
        cx, cy, r = parts["ring"]
        ring = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        for key in ("small_hole", "big_hole"):
            hx, hy, hr = parts[key]
            ring &= (xx - hx) ** 2 + (yy - hy) ** 2 > hr**2
        hem[ring], eos[ring] = 0.4, 0.4
    od = hem[..., None] * _OD_H + eos[..., None] * _OD_E + rng.normal(0, 0.015, (h, w, 3)) + 0.03
    rgb = np.clip(255 * np.exp(-np.clip(od, 0, None)), 0, 255).astype(np.uint8)
    return rgb, parts


def slide_sdata(rgb, transformations=None, units="um"):
    if transformations is None:
        transformations = {"global": Scale([2.0, 2.0], axes=("y", "x"))}
    img = Image2DModel.parse(rgb.transpose(2, 0, 1), dims=("c", "y", "x"), transformations=transformations)
    sdata = SpatialData(images={"he": img})
    sdata.attrs["omx"] = {"units": dict.fromkeys(transformations, units)}
    return sdata


def inside(sdata, key, xy):
    union = shapely.union_all(sdata.shapes[key].geometry.to_numpy())
    return shapely.contains_xy(union, np.asarray(xy, float)[:, 0], np.asarray(xy, float)[:, 1])


@pytest.fixture(scope="module")
def detected():
    rgb, parts = slide()
    sdata = slide_sdata(rgb)
    omx.pp.detect_tissue(sdata)
    return sdata, parts


# ----------------------------------------------------------------------------------------------- detect_tissue
def test_detect_tissue_real_sample_covers_spots_and_not_glass():
    sdata = omx.datasets.her2st_sample("C4")
    omx.pp.detect_tissue(sdata)
    tissue = sdata.shapes["C4_he_tissue"]
    assert len(tissue) >= 1 and tissue.index.tolist() == list(range(len(tissue)))
    spots = omx.pp.resolve_spots(sdata, shapes_key="C4_spots")
    assert inside(sdata, "C4_he_tissue", spots.centers).mean() >= 0.95
    h, w = spots.shape
    corners = [(20, 20), (w - 20, 20), (20, h - 20), (w - 20, h - 20)]  # glass in every corner of this section
    assert not inside(sdata, "C4_he_tissue", corners).any()
    assert 5e6 < tissue["area_um2"].sum() < 10e6  # ~7.5 mm^2 of tissue in a 4.6 x 3.6 mm image


def test_detect_tissue_toy_excludes_white_margin():
    sdata = omx.datasets.toy_sdata(n_spots=100, n_genes=5, n_sections=1, seed=0)
    omx.pp.detect_tissue(sdata)
    spots = omx.pp.resolve_spots(sdata, shapes_key="S1_spots")
    assert inside(sdata, "S1_he_tissue", spots.centers).mean() >= 0.95
    assert not inside(sdata, "S1_he_tissue", [(10, 10), (5, 500)]).any()  # the white margin


def test_detect_tissue_pale_and_dark_specks_and_holes(detected):
    sdata, parts = detected
    tissue = sdata.shapes["he_tissue"]
    cx, cy, r = parts["dark"]
    x0, y0, x1, y1 = parts["pale"]
    rx, ry, rr = parts["ring"]
    assert inside(sdata, "he_tissue", [(cx, cy), (cx + 0.8 * r, cy)]).all()  # dark stain
    assert inside(sdata, "he_tissue", [((x0 + x1) / 2, (y0 + y1) / 2), (x0 + 15, y0 + 15)]).all()  # pale stain
    assert inside(sdata, "he_tissue", [parts["small_hole"][:2], parts["big_hole"][:2]]).all()  # holes filled
    assert not inside(sdata, "he_tissue", [parts["speck"][:2], (10, 10), (780, 580)]).any()  # speck, glass
    assert len(tissue) == 3  # disc, rectangle, ring
    expected = (np.pi * r**2, (x1 - x0) * (y1 - y0), np.pi * rr**2)
    expected = np.sort(np.asarray(expected) * 4.0)[::-1]  # um^2 at 2 um/px
    np.testing.assert_allclose(tissue["area_um2"].to_numpy(), expected, rtol=0.12)
    assert list(tissue["area_um2"]) == sorted(tissue["area_um2"], reverse=True)
    assert tissue.attrs["omx"]["function"] == "detect_tissue"


def test_detect_tissue_min_area_and_hole_area():
    rgb, parts = slide()
    sdata = slide_sdata(rgb)
    omx.pp.detect_tissue(sdata, min_area_um2=1000, hole_area_um2=5000)
    assert inside(sdata, "he_tissue", [parts["speck"][:2]]).all()  # kept with a lower min_area
    assert not inside(sdata, "he_tissue", [parts["big_hole"][:2]]).any()  # 0.038 mm^2 hole stays open
    assert len(sdata.shapes["he_tissue"]) == 4
    ring = sdata.shapes["he_tissue"].geometry.iloc[2]
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1


@pytest.mark.parametrize("gradient", [False, True])
def test_detect_tissue_blank_image_raises(gradient):
    rgb, _ = slide(tissue=False)
    if gradient:  # uneven illumination, no tissue
        rgb = np.clip(rgb * np.linspace(0.85, 1.0, rgb.shape[1])[None, :, None], 0, 255).astype(np.uint8)
    with pytest.raises(ValueError, match="No tissue found in image 'he'.*blank or uniform"):
        omx.pp.detect_tissue(slide_sdata(rgb))
    with pytest.raises(ValueError, match="smaller than min_area_um2"):
        rgb, _ = slide()
        omx.pp.detect_tissue(slide_sdata(rgb), min_area_um2=1e7)


def test_detect_tissue_lines_up_under_transformations():
    rgb, parts = slide()
    transformations = {
        "global": Sequence([Scale([1.5, 1.5], axes=("y", "x")), Translation([100.0, 200.0], axes=("x", "y"))]),
        "other": Identity(),
    }
    sdata = slide_sdata(rgb, transformations)
    sdata.attrs["omx"] = {"units": {"global": "um"}}
    omx.pp.detect_tissue(sdata)
    tissue = sdata.shapes["he_tissue"]
    assert set(get_transformation(tissue, get_all=True)) == {"global", "other"}
    cx, cy, r = parts["dark"]
    in_global = sd.transform(tissue, to_coordinate_system="global")
    centre = (cx * 1.5 + 100, cy * 1.5 + 200)
    pos = int(np.argmin(in_global.distance(shapely.Point(centre))))
    disc = in_global.geometry.iloc[pos]
    assert abs(disc.centroid.x - centre[0]) < 3 and abs(disc.centroid.y - centre[1]) < 3
    assert abs(np.sqrt(disc.area / np.pi) - 1.5 * r) < 5
    assert tissue["area_um2"].iloc[pos] == pytest.approx(disc.area, rel=1e-6)  # mpp 1.5 from "global"


def test_detect_tissue_overwrite_and_key_added(detected):
    sdata, _ = detected
    with pytest.raises(KeyError, match="overwrite=True"):
        omx.pp.detect_tissue(sdata)
    omx.pp.detect_tissue(sdata, key_added="tissue2")
    omx.pp.detect_tissue(sdata, key_added="tissue2", min_area_um2=1000, overwrite=True)
    assert len(sdata.shapes["tissue2"]) == 4
    del sdata.shapes["tissue2"]


def test_detect_tissue_large_single_scale_dask_image():
    """A single-scale image is averaged down chunk by chunk, never loaded whole."""
    import dask.array as da

    def block(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        stained = (xx - 3000) ** 2 + (yy - 2500) ** 2 < 1500**2
        out = np.full((c1 - c0, y1 - y0, x1 - x0), 240, np.uint8)
        out[:, stained] = np.array([150, 90, 170], np.uint8)[c0:c1, None]
        return out

    lazy = da.map_blocks(block, dtype=np.uint8, chunks=((3,), (1024,) * 6, (1024,) * 6))
    img = Image2DModel.parse(lazy, dims=("c", "y", "x"), transformations={"global": Scale([0.5, 0.5], ("y", "x"))})
    sdata = SpatialData(images={"he": img})
    omx.pp.detect_tissue(sdata, mpp=0.5)
    tissue = sdata.shapes["he_tissue"]
    assert len(tissue) == 1
    assert tissue["area_um2"].iloc[0] == pytest.approx(np.pi * 750**2, rel=0.03)


# --------------------------------------------------------------------------------------------------- tile_grid
@pytest.fixture
def plain():
    """A 1000 x 700 px image at 0.5 um/px (500 x 350 um) in microns, no tissue element."""
    rgb, _ = slide(h=700, w=1000)
    return slide_sdata(rgb, {"global": Scale([0.5, 0.5], axes=("y", "x"))})


def test_square_grid_count_and_placement(plain):
    omx.pp.tile_grid(plain, kind="square", size_um=16)
    grid = plain.shapes["he_square_16um"]
    assert len(grid) == (500 // 16) * (350 // 16)  # floor(W / stride) * floor(H / stride) when stride = size
    assert grid.index.tolist() == list(range(len(grid)))
    x0, y0, x1, y1 = shapely.bounds(grid.geometry.to_numpy()).T
    np.testing.assert_allclose(x1 - x0, 32) and np.testing.assert_allclose(y1 - y0, 32)  # 16 um = 32 px
    assert x0.min() == 0 and y0.min() == 0 and x1.max() <= 1000 and y1.max() <= 700  # anchored at the origin
    np.testing.assert_allclose(x0, grid["array_col"] * 32)
    np.testing.assert_allclose(y0, grid["array_row"] * 32)
    assert grid["array_row"].dtype == np.int64
    assert get_transformation(grid, get_all=True) == get_transformation(plain.images["he"], get_all=True)
    # a stride apart from the size: (floor((W - size) / stride) + 1) per axis
    omx.pp.tile_grid(plain, kind="square", size_um=20, stride_um=30, key_added="sparse")
    assert len(plain.shapes["sparse"]) == (int((500 - 20) // 30) + 1) * (int((350 - 20) // 30) + 1)


def test_hex_grid_count_and_spacing(plain):
    omx.pp.tile_grid(plain, kind="hex", size_um=20, stride_um=40)
    grid = plain.shapes["he_hex_20um"]
    assert set(grid.geometry.geom_type) == {"Point"}
    np.testing.assert_allclose(grid["radius"], 20)  # 10 um = 20 px
    xy_um = np.c_[grid.geometry.x, grid.geometry.y] * 0.5
    d, _ = cKDTree(xy_um).query(xy_um, k=7)
    np.testing.assert_allclose(d[:, 1], 40, rtol=1e-9)  # nearest neighbour at the stride
    interior = (xy_um[:, 0] > 60) & (xy_um[:, 0] < 440) & (xy_um[:, 1] > 60) & (xy_um[:, 1] < 290)
    np.testing.assert_allclose(d[interior, 1:], 40, rtol=1e-9)  # six neighbours at the stride
    dy = 40 * np.sqrt(3) / 2
    n_rows = int((350 - 20) // dy) + 1
    even, odd = int((500 - 20) // 40) + 1, int((500 - 20 - 20) // 40) + 1
    assert len(grid) == sum(even if i % 2 == 0 else odd for i in range(n_rows))
    assert ((grid["array_row"] + grid["array_col"]) % 2 == 0).all()  # Visium's doubled columns
    assert (xy_um.min(axis=0) >= 10 - 1e-9).all() and xy_um[:, 0].max() <= 490 and xy_um[:, 1].max() <= 340
    # default stride: Visium's 100 um pitch for 55 um spots
    omx.pp.tile_grid(plain, size_um=55)
    v = plain.shapes["he_hex_55um"]
    d, _ = cKDTree(np.c_[v.geometry.x, v.geometry.y] * 0.5).query(np.c_[v.geometry.x, v.geometry.y] * 0.5, k=2)
    np.testing.assert_allclose(d[:, 1], 100)


def test_grid_within_tissue(detected):
    sdata, parts = detected
    omx.pp.tile_grid(sdata, kind="square", size_um=16, within=None)  # the tissue, found by default
    assert sdata.shapes["he_square_16um"].attrs["omx"]["params"]["within"] == "he_tissue"
    grid = sdata.shapes["he_square_16um"]
    c = shapely.centroid(grid.geometry.to_numpy())
    assert inside(sdata, "he_tissue", np.c_[shapely.get_x(c), shapely.get_y(c)]).all()
    area_um2 = sdata.shapes["he_tissue"]["area_um2"].sum()
    assert len(grid) == pytest.approx(area_um2 / 16**2, rel=0.05)
    omx.pp.tile_grid(sdata, kind="square", size_um=16, within="tissue", key_added="same")
    assert sdata.shapes["same"].geom_equals(grid).all()
    whole = SpatialData(images={"he": sdata.images["he"]})
    whole.attrs["omx"] = sdata.attrs["omx"]
    omx.pp.tile_grid(whole, kind="square", size_um=16)
    assert len(whole.shapes["he_square_16um"]) == (1600 // 16) * (1200 // 16) > len(grid)
    del sdata.shapes["he_square_16um"], sdata.shapes["same"]


def test_grid_within_shapes_with_other_transformations(plain):
    # a 200 x 100 um box at (150, 100) um, in microns with the identity, while the image is in 0.5 um pixels
    box = ShapesModel.parse(
        __import__("geopandas").GeoDataFrame(geometry=[shapely.box(150, 100, 350, 200)]),
        transformations={"global": Identity()},
    )
    plain.shapes["roi"] = box
    omx.pp.tile_grid(plain, kind="square", size_um=10, within="roi")
    grid = sd.transform(plain.shapes["he_square_10um"], to_coordinate_system="global")
    c = grid.geometry.centroid
    assert c.x.between(150, 350).all() and c.y.between(100, 200).all()
    assert len(grid) == 20 * 10  # bins of 10 um anchored at 0 um: centres 155 ... 345, 105 ... 195
    circles = ShapesModel.parse(
        np.array([[250.0, 175.0]]), geometry=0, radius=np.array([50.0]), transformations={"global": Identity()}
    )
    plain.shapes["circle"] = circles
    omx.pp.tile_grid(plain, kind="square", size_um=10, within="circle", key_added="in_circle")
    assert len(plain.shapes["in_circle"]) == pytest.approx(np.pi * 25, rel=0.1)


def test_grid_errors(plain):
    with pytest.raises(ValueError, match="kind"):
        omx.pp.tile_grid(plain, kind="triangle")
    for bad in (0, -5, np.nan, np.inf):
        with pytest.raises(ValueError, match="size_um must be a positive"):
            omx.pp.tile_grid(plain, size_um=bad)
    with pytest.raises(ValueError, match="stride_um must be a positive"):
        omx.pp.tile_grid(plain, size_um=10, stride_um=-1)
    with pytest.raises(KeyError, match="Pass one of them as `within=`"):
        omx.pp.tile_grid(plain, within="nope")
    with pytest.raises(KeyError, match="detect_tissue"):
        omx.pp.tile_grid(plain, within="tissue")
    with pytest.raises(ValueError, match="more than 20,000,000.*size_um"):
        omx.pp.tile_grid(plain, kind="square", size_um=0.05)
    with pytest.raises(ValueError, match="No tile of 600 um fits"):
        omx.pp.tile_grid(plain, kind="square", size_um=600)
    with pytest.warns(omx.OmxWarning, match="overlap"):
        omx.pp.tile_grid(plain, kind="square", size_um=20, stride_um=10)


def test_grid_overwrite(plain):
    omx.pp.tile_grid(plain, kind="square", size_um=50)
    with pytest.raises(KeyError, match="overwrite=True"):
        omx.pp.tile_grid(plain, kind="square", size_um=50)
    omx.pp.tile_grid(plain, kind="square", size_um=50, stride_um=100, overwrite=True)
    assert len(plain.shapes["he_square_50um"]) == 5 * 4


def test_round_trip_and_resolve_spots(detected, tmp_path):
    sdata, _ = detected
    omx.pp.tile_grid(sdata, kind="hex", size_um=55, key_added="hex")
    omx.pp.tile_grid(sdata, kind="square", size_um=16, key_added="square")
    sdata.write(tmp_path / "t.zarr")
    back = sd.read_zarr(tmp_path / "t.zarr")
    for key in ("he_tissue", "hex", "square"):
        assert back.shapes[key].geom_equals(sdata.shapes[key]).all()
        assert back.shapes[key].attrs["omx"] == sdata.shapes[key].attrs["omx"]
    assert (back.shapes["square"]["array_col"] == sdata.shapes["square"]["array_col"]).all()
    hex_spots = omx.pp.resolve_spots(back, image_key="he", shapes_key="hex")
    assert hex_spots.n_spots == len(sdata.shapes["hex"]) and hex_spots.diameter_um == pytest.approx(55)
    square = omx.pp.resolve_spots(back, image_key="he", shapes_key="square")
    assert square.diameter_um == pytest.approx(2 * 16 / np.sqrt(np.pi))  # the circle of equal area
    del sdata.shapes["hex"], sdata.shapes["square"]


def test_predict_expression_on_grid():
    sdata = omx.datasets.toy_sdata(n_spots=100, n_genes=10, n_sections=2, seed=0)
    model = omx.tl.fit_predict(sdata, train="S1", predict="S2", model="ridge", show_progress_bar=False)
    omx.pp.detect_tissue(sdata, image_key="S2_he")
    omx.pp.tile_grid(sdata, image_key="S2_he", kind="square", size_um=100)
    key = "S2_he_square_100um"
    omx.tl.predict_expression(sdata, model, shapes_key=key, show_progress_bar=False)
    pred = sdata.tables["omx_pred"]
    assert pred.n_obs == len(sdata.shapes[key]) > 50
    assert pred.n_vars == len(model.meta_["genes"]) and np.isfinite(pred.X).all()
    assert list(np.atleast_1d(pred.uns["spatialdata_attrs"]["region"])) == [key]
