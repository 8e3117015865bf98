"""A small synthetic H&E-like SpatialData whose expression depends on the local image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage, sparse

from omx.io._st import SectionParts, assemble_sections

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["toy_sdata"]

# Optical density of one unit of stain in R, G, B (Beer-Lambert), close to the usual H&E stain vectors.
_OD_HEMATOXYLIN = np.array([0.55, 0.78, 0.32])
_OD_EOSIN = np.array([0.14, 0.89, 0.41])
_LATENT_NAMES = ("nuclear_density", "nucleus_size", "eosin")
_FIELD_WAVES = 6  # random plane waves per latent field
_FIELD_WAVELENGTH_UM = (500.0, 1200.0)
_NUCLEI_PER_UM2 = 1 / 180  # at latent value 0
_NUCLEUS_RADIUS_UM = 3.5  # at latent value 0
_MARGIN_UM = 150.0


def toy_sdata(
    n_spots: int = 200,
    n_genes: int = 50,
    n_sections: int = 2,
    seed: int = 0,
    *,
    grid: str = "hex",
    spot_pitch: float = 100.0,
    spot_radius: float = 27.5,
    mpp: float = 1.0,
) -> SpatialData:
    """Build a small synthetic H&E-like SpatialData whose expression truly depends on the image.

    Three smooth random fields per section drive the image: nuclear density, nucleus size and eosin
    intensity. Hematoxylin-stained nuclei (purple discs) are scattered with the local density and size on an
    eosin-stained (pink) tissue, with white background around the tissue. Each gene's log-mean is a baseline
    plus a random linear combination of the three field values at the spot (the same combination in every
    section); counts are negative binomial with a library size that varies by spot and by section. Patches
    of the image therefore predict expression on held-out sections.

    Parameters
    ----------
    n_spots
        Spots per section.
    n_genes
        Number of genes (named ``"gene_0"``, ``"gene_1"``, ...).
    n_sections
        Number of sections, named ``"S1"``, ``"S2"``, ... (patients ``"P1"``, ``"P2"``, ...).
    seed
        Seed of the random generator; the same seed gives the same object.
    grid
        ``"hex"`` (Visium-like) or ``"square"`` spot grid.
    spot_pitch
        Centre-to-centre distance of neighbouring spots in microns.
    spot_radius
        Spot radius in microns (Visium: 27.5).
    mpp
        Microns per pixel of the images.

    Returns
    -------
    SpatialData in the layout of `omx.io.read_st`: per section ``S`` an image ``"S_he"`` and circles
    ``"S_spots"``, one table ``"table"`` with raw counts in ``X``, ``obs["section"]``, ``obs["patient"]``,
    ``obsm["spatial"]`` (centres in microns) and ``obsm["toy_latent"]`` (the field values at each spot,
    columns nuclear density, nucleus size, eosin); ``table.uns["toy"]`` holds the gene weights
    (``"weights"``, genes x latents), baselines (``"baseline"``) and the latent names.
    """
    if n_spots < 1 or n_genes < 1 or n_sections < 1:
        raise ValueError("n_spots, n_genes and n_sections must be at least 1.")
    if grid not in ("hex", "square"):
        raise ValueError(f"grid must be 'hex' or 'square', got {grid!r}.")
    if mpp <= 0 or spot_pitch <= 0 or spot_radius <= 0:
        raise ValueError("mpp, spot_pitch and spot_radius must be positive.")
    rng = np.random.default_rng(seed)
    n_latent = len(_LATENT_NAMES)
    weights = rng.normal(0.0, 0.7, size=(n_genes, n_latent))
    baseline = rng.uniform(np.log(1.0), np.log(20.0), size=n_genes)
    genes = [f"gene_{i}" for i in range(n_genes)]

    parts = []
    for i in range(n_sections):
        name = f"S{i + 1}"
        array_xy, centres_um = _spot_grid(n_spots, grid, spot_pitch)
        extent = centres_um.max(axis=0) + 2 * _MARGIN_UM
        centres_um = centres_um + _MARGIN_UM
        fields = [_random_field(rng, extent) for _ in range(n_latent)]
        image = _render(rng, fields, centres_um, extent, spot_pitch=spot_pitch, mpp=mpp)
        latent = np.column_stack([f(centres_um) for f in fields])

        depth = np.exp(rng.normal(0.0, 0.5)) * np.exp(rng.normal(0.0, 0.3, size=n_spots))
        mu = np.exp(baseline[None, :] + latent @ weights.T) * depth[:, None]
        shape = 10.0  # negative binomial as a gamma-Poisson mixture, dispersion 1/10
        counts = rng.poisson(mu * rng.gamma(shape, 1.0 / shape, size=mu.shape))
        parts.append(
            SectionParts(
                name=name,
                patient=f"P{i + 1}",
                image=image,
                mpp=float(mpp),
                centres_px=centres_um / mpp,
                array_xy=array_xy,
                counts=sparse.csr_matrix(counts.astype(np.int32)),
                genes=genes,
                radius_um=float(spot_radius),
                obsm={"toy_latent": latent.astype(np.float64)},
            )
        )
    sdata = assemble_sections(parts)
    sdata.tables["table"].uns["toy"] = {
        "latent_names": list(_LATENT_NAMES),
        "weights": weights,
        "baseline": baseline,
        "seed": int(seed),
    }
    return sdata


def _spot_grid(n: int, grid: str, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Array coordinates (Visium-like doubled columns on the hex grid) and centres in microns, from 0."""
    ncol = int(np.ceil(np.sqrt(n)))
    row, col = np.divmod(np.arange(n), ncol)
    if grid == "hex":
        x_um = (col + 0.5 * (row % 2)) * pitch
        y_um = row * pitch * np.sqrt(3) / 2
        array_xy = np.column_stack([2 * col + row % 2, row])
    else:
        x_um, y_um = col * pitch, row * pitch
        array_xy = np.column_stack([col, row])
    return array_xy.astype(np.int64), np.column_stack([x_um, y_um]).astype(np.float64)


def _random_field(rng: np.random.Generator, extent: np.ndarray):
    """A smooth random field with mean 0 and variance 1: a sum of random plane waves of long wavelength."""
    wavelength = rng.uniform(*_FIELD_WAVELENGTH_UM, size=_FIELD_WAVES)
    angle = rng.uniform(0, 2 * np.pi, size=_FIELD_WAVES)
    k = (2 * np.pi / wavelength)[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    phase = rng.uniform(0, 2 * np.pi, size=_FIELD_WAVES)
    amp = rng.normal(size=_FIELD_WAVES)
    amp /= np.sqrt(np.sum(amp**2) / 2)

    def field(xy_um: np.ndarray) -> np.ndarray:
        return np.cos(np.asarray(xy_um, dtype=np.float64) @ k.T + phase) @ amp

    return field


def _render(rng, fields, centres_um, extent, *, spot_pitch: float, mpp: float) -> np.ndarray:
    """Draw the H&E-like image (uint8, (y, x, 3)) for one section."""
    density, size, eosin = fields
    w, h = (int(np.ceil(e / mpp)) for e in extent)

    # Smooth fields on a coarse grid (every ``step`` um), upsampled to pixels.
    step = 10.0
    gx, gy = np.arange(0, extent[0] + step, step), np.arange(0, extent[1] + step, step)
    grid_xy = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)

    def to_pixels(values: np.ndarray) -> np.ndarray:
        coarse = values.reshape(len(gy), len(gx))
        yy = (np.arange(h) + 0.5) * mpp / step
        xx = (np.arange(w) + 0.5) * mpp / step
        return ndimage.map_coordinates(coarse, np.meshgrid(yy, xx, indexing="ij"), order=1, mode="nearest")

    # Tissue: the spots' bounding box grown by 80 um with a wobbly, rounded outline; white outside.
    lo, hi = centres_um.min(axis=0) - 0.8 * spot_pitch, centres_um.max(axis=0) + 0.8 * spot_pitch
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    d = np.abs((grid_xy - mid) / half)
    superellipse = (d[:, 0] ** 4 + d[:, 1] ** 4) ** 0.25
    wobble = 0.06 * np.cos(grid_xy @ rng.normal(0, 0.006, size=(2, 3)) + rng.uniform(0, 6.3, 3)).sum(axis=1)
    tissue = np.clip((1.0 + wobble - superellipse) / 0.03, 0, 1)
    tissue_px = to_pixels(tissue)

    eosin_px = tissue_px * (0.20 + 0.22 / (1 + np.exp(-1.5 * to_pixels(eosin(grid_xy)))))
    eosin_px *= 1 + 0.6 * ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), 2.0 / mpp)  # texture

    # Nuclei: thinned Poisson process with local density, sized by the size field.
    lam_max = _NUCLEI_PER_UM2 * np.exp(2.5) * extent.prod()
    pts = rng.uniform(0, 1, size=(rng.poisson(lam_max), 2)) * extent
    accept = rng.uniform(size=len(pts)) < np.exp(np.minimum(density(pts), 2.5) - 2.5)
    pts = pts[accept]
    inside = ndimage.map_coordinates(tissue.reshape(len(gy), len(gx)), (pts[:, ::-1] / step).T, order=1) > 0.5
    pts = pts[inside]
    radius_um = _NUCLEUS_RADIUS_UM * np.exp(0.3 * size(pts)) * rng.uniform(0.85, 1.15, size=len(pts))
    strength = rng.uniform(0.8, 1.2, size=len(pts))
    centre_px = np.round(pts / mpp).astype(np.int64)
    radius_px = np.maximum(1, np.round(radius_um / mpp).astype(np.int64))
    hema_px = _draw_nuclei((h, w), centre_px, radius_px, strength)
    hema_px = ndimage.gaussian_filter(hema_px, 0.6 / mpp) * 0.9 + 0.04 * tissue_px
    return _stain_rgb(hema_px, np.clip(eosin_px, 0, None).astype(np.float32), rng)


def _draw_nuclei(shape: tuple[int, int], centre_px: np.ndarray, radius_px: np.ndarray, strength: np.ndarray):
    """Hematoxylin density (float32 ``shape``) of flat discs at ``centre_px`` ``(n, 2)`` as (x, y) pixels.

    Pixels of discs that fall outside the array are left out, so an image can be drawn block by block.
    """
    h, w = shape
    hema_px = np.zeros((h, w), dtype=np.float32)
    for r in np.unique(radius_px):
        sel = radius_px == r
        oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
        disc = oy**2 + ox**2 <= r**2 + r * 0.5
        oy, ox = oy[disc], ox[disc]
        ys, xs = centre_px[sel, 1, None] + oy[None, :], centre_px[sel, 0, None] + ox[None, :]
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        hema_px[ys[inside], xs[inside]] = np.repeat(strength[sel], len(oy)).reshape(ys.shape)[inside]
    return hema_px


def _stain_rgb(hema_px: np.ndarray, eosin_px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 ``(y, x, 3)`` of hematoxylin and eosin densities (Beer-Lambert), with scanner noise."""
    od = hema_px[..., None] * _OD_HEMATOXYLIN.astype(np.float32) + eosin_px[..., None] * _OD_EOSIN.astype(np.float32)
    od += 0.02 * rng.standard_normal((*hema_px.shape, 1), dtype=np.float32)  # scanner noise
    rgb = 255.0 * np.exp(-np.log(10, dtype=np.float32) * np.clip(od, 0, None))
    return np.clip(rgb, 0, 255).astype(np.uint8)
