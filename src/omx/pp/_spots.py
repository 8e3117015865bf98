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
from omx._settings import warn
from omx._utils import HD_BIN, default_bin_table, logger, resolve_key

_MICRON_NAMES = {"um", "micron", "microns", "micrometer", "micrometre", "µm"}
#: Channel names of an RGB image; an image whose channels have other names (``"DAPI"``, ...) is not an H&E.
_RGB_NAMES = {"r", "g", "b", "a", "red", "green", "blue", "alpha"}
#: Visium spots are 55 um across; Xenium's morphology images have 0.2125 um pixels.
VISIUM_SPOT_UM = 55.0
XENIUM_PIXEL_UM = 0.2125
#: Shapes read for a platform's scale (enough for a robust median, cheap on a million bins).
_SCALE_SAMPLE = 2000
_NO_MPP = (
    "Pass `mpp=` (microns per pixel of the image's finest level), or mark the coordinate system as microns with "
    "`sdata.attrs['omx'] = {{'units': {{{cs!r}: 'um'}}}}`. omx finds it by itself in coordinate systems in microns and "
    "in objects read by spatialdata_io.visium, visium_hd and xenium (sdata.attrs['spatialdata_io_reader'])."
)


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
        The image's pyramid levels, finest first, each a ``('c', 'y', 'x')`` uint8 `xarray.DataArray`: an image
        of another dtype is converted lazily with one value scale for the whole image (`image_levels`).
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


def linear_scale(affine: np.ndarray) -> float:
    """How much a ``(3, 3)`` affine scales lengths: the square root of its area scale."""
    return float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))


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
    to it. Otherwise `platform_mpp` reads it from what a spatialdata-io object carries. Raises a `ValueError` telling
    the user to pass ``mpp=`` when neither tells, or when ``mpp`` is not positive.
    """
    if mpp is None:
        level0 = _levels(image)[0]
        systems = _coordinate_systems(level0)
        cs = next((c for c in systems if _is_micron_system(sdata, c)), None)
        if cs is not None:
            mpp = linear_scale(affine_xy(level0, cs))
        else:
            found = next((f for c in systems if (f := platform_mpp(sdata, level0, c)) is not None), None)
            if found is None:
                raise ValueError("Cannot tell the microns per pixel of the image. " + _NO_MPP.format(cs=systems[0]))
            mpp = found[0]
    return check_mpp(mpp)


def check_mpp(mpp) -> float:
    """``mpp`` as a positive finite float; a `TypeError` for a string or other non-number, a `ValueError` otherwise."""
    if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.integer | np.floating):
        raise TypeError(f"mpp (microns per pixel) must be a number, got {mpp!r} ({type(mpp).__name__}).")
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"Microns per pixel must be positive, got {mpp}.")
    return mpp


def reader_of(sdata: SpatialData) -> str | None:
    """The spatialdata-io reader that made the object (``"visium"``, ``"visium_hd"``, ``"xenium"``, ...), if any."""
    return (sdata.attrs or {}).get("spatialdata_io_reader")


def platform_mpp(sdata: SpatialData, level0, cs: str, shapes_key: str | None = None) -> tuple[float, str] | None:
    """Microns per pixel of an image's finest level from what a spatialdata-io object carries, and how it was found.

    - Visium HD (shapes named ``..._square_008um``): the bins' side is the bin size.
    - Visium (``attrs["spatialdata_io_reader"] == "visium"``): the spots are 55 um across.
    - Xenium: the shapes' own coordinates are microns (spatialdata-io scales them by ``1 / pixel_size`` to
      ``"global"``, whose unit is a morphology pixel).

    ``shapes_key`` is the shapes element to read; None tries each one in ``cs``. Returns None when none tells.
    """
    reader = reader_of(sdata)
    keys = [shapes_key] if shapes_key is not None else list(sdata.shapes.keys())
    for key in keys:
        shapes = sdata.shapes[key]
        if cs not in _coordinate_systems(shapes) or len(shapes) == 0:
            continue
        px_per_unit = linear_scale(to_pixels(shapes, level0, cs))
        hd = HD_BIN.search(key)
        if hd is not None and reader in (None, "visium_hd"):
            sample = shapes.iloc[:_SCALE_SAMPLE]
            _, radius = _shape_geometry(sample, key)
            squares = set(sample.geometry.geom_type.unique()) <= {"Polygon", "MultiPolygon"}
            side = float(np.median(radius)) * (np.sqrt(np.pi) if squares else 2.0)
            bin_um = float(hd.group(1))
            return bin_um / (side * px_per_unit), f"Visium HD's {bin_um:g} um bins ({key!r})"
        if reader == "visium" or (reader is None and _visium_like(shapes, cs)):
            _, radius = _shape_geometry(shapes.iloc[:_SCALE_SAMPLE], key)
            return VISIUM_SPOT_UM / (2 * float(np.median(radius)) * px_per_unit), f"Visium's 55 um spots ({key!r})"
        if reader == "xenium" or (reader is None and _xenium_like(shapes, cs)):
            return 1.0 / px_per_unit, f"Xenium's shapes in microns ({key!r})"
    return None


def _visium_like(shapes, cs: str) -> bool:
    """Circles with spatialdata-io's Visium coordinate systems (``<cs>_downscaled_hires``), attrs or not.

    `spatialdata.concatenate` drops ``attrs`` unless told otherwise, so the reader's name may be gone.
    """
    systems = _coordinate_systems(shapes)
    return f"{cs}_downscaled_hires" in systems and "radius" in shapes.columns


def _xenium_like(shapes, cs: str) -> bool:
    """Shapes scaled by ``1 / 0.2125`` into ``cs``: spatialdata-io's Xenium shapes, microns to morphology pixels.

    Recognised without ``attrs`` (which `spatialdata.concatenate` drops); every Xenium instrument so far images at
    0.2125 um per pixel.
    """
    m = affine_xy(shapes, cs)
    return bool(np.allclose(m[:2, :2], np.eye(2) / XENIUM_PIXEL_UM, rtol=1e-3) and np.allclose(m[:2, 2], 0))


def looks_rgb(level) -> bool:
    """Whether an image level can be an H&E: 3 or 4 channels, not named as fluorescence channels are."""
    if "c" not in level.dims or level.sizes["c"] not in (3, 4):
        return False
    names = [c for c in np.asarray(level.coords["c"].values).tolist() if isinstance(c, str)]
    return all(n.lower() in _RGB_NAMES for n in names)


def pick_image(sdata: SpatialData, candidates: list[str], *, argument: str = "image_key") -> str:
    """The H&E among candidate images: RGB ones only (when any), then the finest in a shared coordinate system.

    spatialdata-io's Visium readers add the full-resolution image with its hires and lowres copies, and Xenium's
    its fluorescence morphology images beside the H&E; the finest RGB image is the one to cut patches from. A real
    choice (several images of the same pixel size, or in no shared coordinate system) raises a `KeyError` listing
    the options and the argument to pass.
    """
    if len(candidates) <= 1:
        return resolve_key(None, candidates, kind="image", argument=argument)
    levels0 = {k: _levels(sdata.images[k])[0] for k in candidates}
    rgb = [k for k in candidates if looks_rgb(levels0[k])]
    options = rgb or candidates
    if len(options) == 1:
        return options[0]
    shared = set.intersection(*(set(_coordinate_systems(levels0[k])) for k in options))
    if shared:
        cs = sorted(shared)[0]
        size = {k: linear_scale(affine_xy(levels0[k], cs)) for k in options}
        finest = min(size, key=size.get)
        if sum(np.isclose(v, size[finest], rtol=0.01) for v in size.values()) == 1:
            others = [k for k in options if k != finest]
            logger.info(f"Using image {finest!r}, finer than {others}; pass `{argument}=` for another.")
            return finest
    why = "none is finer than the others" if shared else "they share no coordinate system to compare them in"
    raise KeyError(f"Ambiguous image: {options} all fit and {why}. Pass one of them as `{argument}=`.")


def resolve_image(sdata: SpatialData, image_key: str | None) -> str:
    """``image_key`` when given (checked), else the object's H&E as `pick_image` finds it among all images."""
    if image_key is None:
        return pick_image(sdata, list(sdata.images.keys()))
    return resolve_key(image_key, sdata.images.keys(), kind="image", argument="image_key")


def linked_ids(table) -> pd.Index:
    """The ids by which shapes that a table does not annotate hold its rows: ``obs["cell_id"]``, else obs names.

    spatialdata-io's Xenium table annotates the labels ``"cell_labels"`` and keeps each cell's id in
    ``obs["cell_id"]``, the index of the polygons ``"cell_boundaries"``; `spatialdata.concatenate` suffixes the obs
    names but not that column.
    """
    return pd.Index(table.obs["cell_id"].astype(str) if "cell_id" in table.obs else table.obs_names)


def region_shapes(sdata: SpatialData, table, region: str) -> str | None:
    """The shapes element holding a table region's instances: the region itself, or shapes that share its ids.

    A table region that is a labels element (Xenium's ``"cell_labels"``) is reached through the shapes of its
    coordinate system whose index holds the region's `linked_ids` (``"cell_boundaries"``; cells before nuclei).
    """
    if region in sdata.shapes:
        return region
    _, region_key, _ = get_table_keys(table)
    rows = (table.obs[region_key] == region).to_numpy()
    ids = linked_ids(table)[rows]
    systems = set(_coordinate_systems(sdata.labels[region])) if region in sdata.labels else None
    linked = [
        k
        for k, sh in sdata.shapes.items()
        if len(sh)
        and (systems is None or systems & set(_coordinate_systems(sh)))
        and pd.Index(sh.index.astype(str)).isin(ids).mean() > 0.5
    ]
    if len(linked) > 1:
        linked = [k for k in linked if "nucle" not in k.lower()] or linked
    return linked[0] if len(linked) == 1 else None


def section_column(table, section_key: str | None = "section") -> str:
    """The obs column that names sections: ``section_key``; without a ``"section"`` column, the region column.

    spatialdata-io's readers make one shapes element per sample and no ``"section"`` column, so their region column
    names the sections. The fallback applies to the default name only, so that a mistyped ``section_key`` is an
    error, not a silent switch to the region column.
    """
    if section_key in table.obs.columns:
        return section_key
    _, region_key, _ = get_table_keys(table)
    if section_key in (None, Key.SECTION):
        return region_key
    raise KeyError(
        f"The table has no obs column {section_key!r} (columns: {list(table.obs.columns)}). "
        "Pass `section_key=` naming each spot's section."
    )


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
        annotating = [k for k in annotating if shapes_key in annotated_shapes(sdata, sdata.tables[k])]
    # omx's own tables (predictions, nuclei) hold no measurement of the shapes: only `table_key=` picks them
    annotating = [k for k in annotating if Key.TABLE_MARK not in sdata.tables[k].uns]
    if len(annotating) > 1:
        chosen = default_bin_table(annotating)
        if chosen is not None:
            return chosen
        raise KeyError(f"Ambiguous table: {annotating} all fit. Pass one of them as `table_key=`.")
    return annotating[0] if annotating else None


def annotated_shapes(sdata: SpatialData, table) -> dict[str, str]:
    """The shapes elements whose instances a table measures, each with the table region it comes from."""
    out = {}
    for region in table_regions(table)[0]:
        key = region_shapes(sdata, table, region)
        if key is not None:
            out[key] = region
    return out


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
    the image's transformation when the coordinate system is in microns (``sdata.attrs["omx"]["units"]``), else
    from what a spatialdata-io object carries (`platform_mpp`: Visium's 55 um spots, Visium HD's bin size,
    Xenium's shapes in microns). An omitted ``image_key`` picks the finest RGB image that shares a coordinate
    system with the shapes (Visium's full-resolution image over hires and lowres, Xenium's H&E over its
    fluorescence images).
    """
    table_key = _pick_table(sdata, table_key, shapes_key)
    table = sdata.tables[table_key] if table_key is not None else None
    annotated = annotated_shapes(sdata, table) if table is not None else {}
    if shapes_key is None:
        candidates = list(annotated) if table is not None else list(sdata.shapes.keys())
        shapes_key = resolve_key(None, candidates, kind="shapes element", argument="shapes_key")
    shapes_key = resolve_key(shapes_key, sdata.shapes.keys(), kind="shapes element", argument="shapes_key")
    if table is not None:
        regions = table_regions(table)[0]
        if shapes_key not in annotated:
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
        image_key = pick_image(sdata, candidates)
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

    levels = image_levels(image, image_key)
    level0 = levels[0]
    level_scales = [float(level0.sizes["x"]) / float(lv.sizes["x"]) for lv in levels]

    img_affine = affine_xy(level0, cs)
    affine = to_pixels(shapes, level0, cs)
    centers_units, radius_units = _shape_geometry(shapes, shapes_key)
    homog = np.c_[centers_units, np.ones(len(centers_units))]
    centers = (homog @ affine.T)[:, :2]
    radius_px = radius_units * linear_scale(affine)

    bad = ~(np.isfinite(centers).all(axis=1) & np.isfinite(radius_px))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(centers)} spots of {shapes_key!r} have NaN or infinite coordinates or sizes, "
            f"e.g. {shapes.index[bad][:10].tolist()}; a spot without a place gives a garbage patch that shifts the "
            "whole section's features. Drop them or fix their geometry."
        )
    if not shapes.index.is_unique:
        dup = pd.unique(shapes.index[shapes.index.duplicated()])[:10].tolist()
        raise ValueError(
            f"Shapes {shapes_key!r} have duplicated index values, e.g. {dup}: spots are matched to table rows by "
            "index, so each needs its own. Make the index unique (and the table's instance key column to match)."
        )
    if mpp is None and spot_diameter_um is not None:
        mpp = float(spot_diameter_um / (2 * np.median(radius_px)))
    if mpp is None and _is_micron_system(sdata, cs):
        mpp = linear_scale(img_affine)
    if mpp is None:
        found = platform_mpp(sdata, level0, cs, shapes_key)
        if found is None:
            raise ValueError(
                f"Cannot tell the microns per pixel of image {image_key!r}: coordinate system {cs!r} is not in "
                "microns and the object does not say its platform. " + _NO_MPP.format(cs=cs)
            )
        mpp, how = found
        logger.info(f"Image {image_key!r}: {mpp:.4g} um per pixel, from {how}.")
    mpp = check_mpp(mpp)

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
        for column, what in ((region_key, "region key"), (instance_key, "instance key")):
            if column not in table.obs:
                raise KeyError(
                    f"Table {table_key!r} has no obs column {column!r}, its {what} "
                    f"(uns['spatialdata_attrs']); its columns: {list(table.obs.columns)}. Restore the column, or "
                    "re-parse the table with `TableModel.parse(adata, region=..., region_key=..., instance_key=...)`."
                )
        region = annotated[shapes_key]
        rows = np.flatnonzero((table.obs[region_key] == region).to_numpy())
        # shapes that share the table's ids (Xenium's cells) are matched by cell id, the others by instance key
        ids = linked_ids(table) if region != shapes_key else table.obs[instance_key]
        instance = pd.Index(np.asarray(ids)[rows])
        if not instance.is_unique:
            dup = pd.unique(instance[instance.duplicated()])[:10].tolist()
            raise ValueError(
                f"Table {table_key!r} has rows with the same instance id for shapes {shapes_key!r}, e.g. {dup} "
                f"(obs[{instance_key!r}]): one spot cannot have two measurements. Make the ids unique."
            )
        pos = instance.get_indexer(shapes.index.astype(str) if region != shapes_key else shapes.index)
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


#: Pixels of the coarsest level read to decide an image's value scale (strided when the level is larger).
_PROBE_PIXELS = 2048**2
_TO_UINT8 = "Convert it to 8-bit RGB (uint8, 0-255) before passing it to omx."


def image_levels(image, image_key: str) -> list[xr.DataArray]:
    """An RGB image's pyramid levels, finest first, as uint8 ``('c', 'y', 'x')`` arrays in 0-255.

    The value scale is decided once per image, from what its coarsest level holds (`value_scale`), so every patch,
    chunk and reader of the image converts its values the same way. uint8 levels are returned as they are; others
    are converted lazily, block by block, into new arrays (the user's image is not changed).
    """
    levels = _levels(image)
    _check_image(levels[0], image_key)
    factor = value_scale(levels, image_key)
    if factor is None:
        return levels
    return [_as_uint8(level, factor) for level in levels]


def value_scale(levels: list[xr.DataArray], image_key: str) -> float | None:
    """The factor that maps an image's values to 0-255, None for uint8 (kept as is).

    Read from the coarsest level: integers whose values fit in 8 bits are 8-bit values (a warning says so when the
    dtype is wider); others are scaled by their power-of-two range (``65535 / 255`` for 16-bit; 10-, 12- and 14-bit
    scans are scaled by their own range, with a warning); floats in [0, 1] are multiplied by 255, floats in
    [0, 255] kept. Raises a `ValueError` for negative values, floats above 255, NaN or infinity.
    """
    import dask.array as da

    dtype = levels[0].dtype
    if dtype == np.uint8:
        return None
    data = da.asarray(levels[-1].data)[:3]
    h, w = data.shape[1:]
    step = int(np.ceil(np.sqrt(h * w / _PROBE_PIXELS))) if h * w > _PROBE_PIXELS else 1
    sample = np.asarray(data[:, ::step, ::step])
    if sample.size == 0:
        return 1.0
    what = f"Image {image_key!r} ({dtype})"
    if np.issubdtype(dtype, np.floating):
        finite = np.isfinite(sample)
        if not finite.all():
            bad = "NaN" if np.isnan(sample).any() else "infinite"
            raise ValueError(f"{what} holds {bad} values; an H&E image has none. {_TO_UINT8}")
        lo, hi = float(sample.min()), float(sample.max())
        if lo < -1e-3 or hi > 255.5:
            raise ValueError(
                f"{what} holds values from {lo:.4g} to {hi:.4g}; omx reads float images as 0-1 or 0-255 RGB and "
                f"cannot tell what these mean. {_TO_UINT8}"
            )
        factor = 255.0 if hi <= 1.0 + 1e-3 else 1.0
        logger.info(f"{what}: values {lo:.3g}-{hi:.3g}, read as 0-{255 / factor:g} RGB.")
        return factor
    lo, hi = int(sample.min()), int(sample.max())
    if lo < 0:
        raise ValueError(f"{what} holds negative values (down to {lo}); an RGB image has none. {_TO_UINT8}")
    bits = max(8, int(hi).bit_length())
    if bits == 8:
        if dtype.itemsize > 1:
            warn(
                f"{what} holds values 0-{hi} only: read as 8-bit values (0-255), not as a dim {8 * dtype.itemsize}"
                f"-bit image. {_TO_UINT8}"
            )
        return 1.0
    top = 2**bits - 1
    if bits != 8 * dtype.itemsize:
        warn(
            f"{what} holds values up to {hi}: read as a {bits}-bit image (0-{top}, as from a {bits}-bit scanner), "
            f"so {top} is white. If its range is another one, convert it to 8-bit RGB (uint8, 0-255) yourself."
        )
    return 255.0 / top


def _as_uint8(level: xr.DataArray, factor: float) -> xr.DataArray:
    """A new level holding ``clip(round(values * factor), 0, 255)`` as uint8, converted lazily block by block."""
    import dask.array as da

    def convert(block: np.ndarray) -> np.ndarray:
        out = block.astype(np.float32) * np.float32(factor)
        np.nan_to_num(out, copy=False, nan=255.0)  # NaN the probe did not see: white, like the padding
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    return level.copy(data=da.asarray(level.data).map_blocks(convert, dtype=np.uint8))


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
