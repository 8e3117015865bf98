"""Resolve spots (or cells) of a SpatialData object against one H&E image, in that image's pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr
from spatialdata import SpatialData, get_pyramid_levels
from spatialdata.models import get_table_keys
from spatialdata.transformations import get_transformation

from omx._docs import doc_params
from omx._schema import Key
from omx._utils import logger, resolve_key

_MICRON_NAMES = {"um", "micron", "microns", "micrometer", "micrometre", "µm"}


@dataclass
class Spots:
    """Spots of one shapes element, placed in the pixels of one image.

    Attributes
    ----------
    image_key, shapes_key, table_key
        The elements they came from (``table_key`` is None when no table annotates the shapes).
    coordinate_system
        The coordinate system that links shapes and image.
    levels
        The image's pyramid levels, finest first, each a ``('c', 'y', 'x')`` `xarray.DataArray`.
    level_scales
        Level-0 pixels per pixel of each level.
    centers
        ``(n, 2)`` spot centres as ``(x, y)`` in level-0 pixels.
    radius_px
        ``(n,)`` spot radii in level-0 pixels.
    mpp
        Microns per level-0 pixel.
    index
        The shapes' index of each spot.
    table_rows
        For each spot, its row position in the table, or -1 when the table has no row for it.
    """

    image_key: str
    shapes_key: str
    table_key: str | None
    coordinate_system: str
    levels: list[xr.DataArray]
    level_scales: list[float]
    centers: np.ndarray
    radius_px: np.ndarray
    mpp: float
    index: pd.Index
    table_rows: np.ndarray = field(repr=False)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.centers)

    @property
    def diameter_um(self) -> float:
        """Median spot diameter in microns."""
        return float(2 * np.median(self.radius_px) * self.mpp)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0 in pixels."""
        return int(self.levels[0].sizes["y"]), int(self.levels[0].sizes["x"])

    def subset(self, mask: np.ndarray) -> Spots:
        """Return the spots where ``mask`` (boolean or integer positions) selects them."""
        return Spots(
            image_key=self.image_key,
            shapes_key=self.shapes_key,
            table_key=self.table_key,
            coordinate_system=self.coordinate_system,
            levels=self.levels,
            level_scales=self.level_scales,
            centers=self.centers[mask],
            radius_px=self.radius_px[mask],
            mpp=self.mpp,
            index=self.index[mask],
            table_rows=self.table_rows[mask],
        )


def affine_xy(element, coordinate_system: str) -> np.ndarray:
    t = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def to_pixels(element, level0, coordinate_system: str) -> np.ndarray:
    """The ``(3, 3)`` affine from an element's own coordinates to the pixels of an image's finest level."""
    return np.linalg.inv(affine_xy(level0, coordinate_system)) @ affine_xy(element, coordinate_system)


def geometries_in_pixels(geometries, affine: np.ndarray):
    """Shapely geometries mapped by a ``(3, 3)`` affine (e.g. `to_pixels`), vectorised."""
    import shapely

    linear, shift = affine[:2, :2], affine[:2, 2]
    return shapely.transform(geometries, lambda xy: xy @ linear.T + shift)


def _coordinate_systems(element) -> list[str]:
    return list(get_transformation(element, get_all=True).keys())


def _is_micron_system(sdata: SpatialData, coordinate_system: str) -> bool:
    units = (sdata.attrs or {}).get(Key.ATTRS, {}).get("units", {})
    unit = units.get(coordinate_system, "")
    return str(unit).lower() in _MICRON_NAMES or coordinate_system.lower() in _MICRON_NAMES


def image_mpp(sdata: SpatialData, image, mpp: float | None = None) -> float:
    """Microns per pixel of an image's finest level: ``mpp`` when given, else from a coordinate system in microns.

    A coordinate system is in microns when ``sdata.attrs["omx"]["units"]`` says so or its name is a micron unit
    (``"um"``, ``"microns"``, ...); the pixel size is the square root of the area scale of the level's transformation
    to it. Raises a `ValueError` telling the user to pass ``mpp=`` otherwise, or when ``mpp`` is not positive.
    """
    if mpp is None:
        level0 = _levels(image)[0]
        cs = next((c for c in _coordinate_systems(level0) if _is_micron_system(sdata, c)), None)
        if cs is None:
            raise ValueError(
                "Cannot tell the microns per pixel of the image: pass `mpp=`, or mark its coordinate system as "
                "microns with `sdata.attrs['omx'] = {'units': {cs: 'um'}}`."
            )
        mpp = float(np.sqrt(abs(np.linalg.det(affine_xy(level0, cs)[:2, :2]))))
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"Microns per pixel must be positive, got {mpp}.")
    return mpp


def table_regions(table) -> tuple[list[str], str, str]:
    """Return ``(regions, region_key, instance_key)`` of a SpatialData table."""
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    return regions, region_key, instance_key


def _pick_table(sdata: SpatialData, table_key: str | None, shapes_key: str | None) -> str | None:
    if table_key is not None:
        return resolve_key(table_key, sdata.tables.keys(), kind="table", argument="table_key")
    annotating = list(sdata.tables.keys())
    if shapes_key is not None:
        annotating = [k for k in annotating if shapes_key in table_regions(sdata.tables[k])[0]]
    # omx's own tables (predictions, nuclei) hold no measurement of the shapes: only `table_key=` picks them
    annotating = [k for k in annotating if Key.TABLE_MARK not in sdata.tables[k].uns]
    if len(annotating) > 1:
        raise KeyError(f"Ambiguous table: {annotating} all fit. Pass `table_key=`.")
    return annotating[0] if annotating else None


@doc_params()
def resolve_spots(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    mpp: float | None = None,
    spot_diameter_um: float | None = None,
) -> Spots:
    """Place the spots of a shapes element in the pixels of an image.

    Parameters
    ----------
    {sdata}
    {image_key}
    {shapes_key}
    {table_key_spots}
    coordinate_system
        The coordinate system that links image and shapes; omitted, one they share.
    {mpp}
    spot_diameter_um
        The true spot diameter (ST v1: 100, Visium: 55), used to derive ``mpp`` from the spots' radius
        in pixels when the coordinate system is not in microns.

    Returns
    -------
    The resolved :class:`Spots`. Microns per pixel come from ``mpp``, else from ``spot_diameter_um``, else from
    the image's transformation when the coordinate system is in microns (``sdata.attrs["omx"]["units"]``).
    """
    table_key = _pick_table(sdata, table_key, shapes_key)
    table = sdata.tables[table_key] if table_key is not None else None
    if shapes_key is None:
        candidates = list(sdata.shapes.keys())
        if table is not None:
            candidates = [r for r in table_regions(table)[0] if r in sdata.shapes]
        shapes_key = resolve_key(None, candidates, kind="shapes element", argument="shapes_key")
    shapes_key = resolve_key(shapes_key, sdata.shapes.keys(), kind="shapes element", argument="shapes_key")
    if table is not None:
        regions = table_regions(table)[0]
        if shapes_key not in regions:
            raise ValueError(
                f"Table {table_key!r} does not annotate shapes {shapes_key!r} (it annotates {regions}). "
                "Pass the `table_key=` of a table that does, or set its region with "
                "`TableModel.parse(adata, region=..., region_key=..., instance_key=...)`."
            )
    shapes = sdata.shapes[shapes_key]
    shapes_systems = _coordinate_systems(shapes)
    if image_key is None:
        candidates = [k for k, im in sdata.images.items() if set(_coordinate_systems(im)) & set(shapes_systems)]
        if not candidates:
            raise KeyError(
                f"No image shares a coordinate system with shapes {shapes_key!r} ({shapes_systems}). "
                f"Images: {list(sdata.images.keys())}. Pass `image_key=` and give it a transformation "
                "to the shapes' coordinate system."
            )
        image_key = resolve_key(None, candidates, kind="image", argument="image_key")
    image_key = resolve_key(image_key, sdata.images.keys(), kind="image", argument="image_key")
    image = sdata.images[image_key]
    common = [c for c in _coordinate_systems(image) if c in shapes_systems]
    if coordinate_system is not None:
        if coordinate_system not in common:
            raise KeyError(
                f"Coordinate system {coordinate_system!r} does not hold both image and shapes; shared: {common}."
            )
        common = [coordinate_system]
    if not common:
        raise ValueError(
            f"Image {image_key!r} and shapes {shapes_key!r} share no coordinate system "
            f"(image: {_coordinate_systems(image)}, shapes: {shapes_systems}); add a transformation."
        )
    cs = next((c for c in common if _is_micron_system(sdata, c)), common[0])

    levels = _levels(image)
    level0 = levels[0]
    _check_image(level0, image_key)
    level_scales = [float(level0.sizes["x"]) / float(lv.sizes["x"]) for lv in levels]

    img_affine = affine_xy(level0, cs)
    affine = to_pixels(shapes, level0, cs)
    centers_units, radius_units = _shape_geometry(shapes, shapes_key)
    homog = np.c_[centers_units, np.ones(len(centers_units))]
    centers = (homog @ affine.T)[:, :2]
    radius_px = radius_units * np.sqrt(abs(np.linalg.det(affine[:2, :2])))

    if mpp is None and spot_diameter_um is not None:
        mpp = float(spot_diameter_um / (2 * np.median(radius_px)))
    if mpp is None:
        if not _is_micron_system(sdata, cs):
            raise ValueError(
                f"Cannot tell the microns per pixel of image {image_key!r}: coordinate system {cs!r} is not marked "
                "as microns. Pass `mpp=` (microns per pixel of the full-resolution image) or `spot_diameter_um=` "
                "(ST v1: 100, Visium: 55), or mark it with `sdata.attrs['omx'] = {'units': {cs: 'um'}}`."
            )
        mpp = float(np.sqrt(abs(np.linalg.det(img_affine[:2, :2]))))
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"Microns per pixel must be positive, got {mpp}.")

    h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
    outside = (centers[:, 0] < 0) | (centers[:, 0] >= w) | (centers[:, 1] < 0) | (centers[:, 1] >= h)
    if outside.any():
        names = list(shapes.index[outside][:10])
        raise ValueError(
            f"{int(outside.sum())} of {len(centers)} spots of {shapes_key!r} lie outside image {image_key!r} "
            f"({w} x {h} px), e.g. {names}. Check the transformations of both elements to {cs!r}, or drop those spots."
        )

    table_rows = np.full(len(shapes), -1, dtype=np.int64)
    if table is not None:
        _, region_key, instance_key = table_regions(table)
        rows = np.flatnonzero((table.obs[region_key] == shapes_key).to_numpy())
        instance = pd.Index(table.obs[instance_key].to_numpy()[rows])
        pos = instance.get_indexer(shapes.index)
        table_rows[pos >= 0] = rows[pos[pos >= 0]]
        if (pos < 0).any():
            logger.info(
                "%d of %d spots of %r have no row in table %r.", int((pos < 0).sum()), len(pos), shapes_key, table_key
            )
    return Spots(
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        coordinate_system=cs,
        levels=levels,
        level_scales=level_scales,
        centers=centers,
        radius_px=np.asarray(radius_px, dtype=float),
        mpp=mpp,
        index=shapes.index,
        table_rows=table_rows,
    )


def _levels(image) -> list[xr.DataArray]:
    if isinstance(image, xr.DataArray):
        return [image]
    n = len(image.children)
    return [get_pyramid_levels(image, n=i) for i in range(n)]


def _check_image(level: xr.DataArray, image_key: str) -> None:
    if "c" not in level.dims or level.sizes["c"] not in (3, 4):
        n = level.sizes.get("c", 1)
        raise ValueError(
            f"Image {image_key!r} has {n} channel(s); omx needs an RGB H&E image (3 channels, or RGBA). "
            "Convert it first, e.g. stack a greyscale image three times only if it really is a brightfield scan."
        )
    if not (np.issubdtype(level.dtype, np.integer) or np.issubdtype(level.dtype, np.floating)):
        raise ValueError(f"Image {image_key!r} has dtype {level.dtype}; omx needs uint8 (or integer / float) RGB.")


def _shape_geometry(shapes, shapes_key: str) -> tuple[np.ndarray, np.ndarray]:
    geom = shapes.geometry
    kinds = set(geom.geom_type.unique())
    if kinds <= {"Point"}:
        if "radius" not in shapes.columns:
            raise ValueError(
                f"Shapes {shapes_key!r} are points without a `radius` column; omx needs circles or polygons."
            )
        centers = np.c_[geom.x.to_numpy(), geom.y.to_numpy()]
        return centers, shapes["radius"].to_numpy(dtype=float)
    if kinds <= {"Polygon", "MultiPolygon"}:
        c = geom.centroid
        return np.c_[c.x.to_numpy(), c.y.to_numpy()], np.sqrt(geom.area.to_numpy() / np.pi)
    raise ValueError(f"Shapes {shapes_key!r} hold {sorted(kinds)}; omx needs circles (points with radius) or polygons.")
