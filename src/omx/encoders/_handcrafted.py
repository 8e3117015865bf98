"""Handcrafted patch features: colour, H&E stain, tissue and nuclear density, texture (numpy, scipy, scikit-image)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb
from skimage.feature import graycomatrix, graycoprops

from omx.encoders._base import Encoder

#: Stain-separation matrix of Ruifrok & Johnston (`skimage.color.hed_from_rgb`): optical density -> H, E, DAB.
HED_FROM_RGB = hed_from_rgb.astype(np.float32)

_QUANTILES = (0.1, 0.5, 0.9)
# Histogram edges of the H and E concentrations (natural optical density units).
_H_EDGES = np.array([0.25, 0.5, 0.75, 1.0, 1.5, 2.0], dtype=np.float32)
_E_EDGES = np.array([0.1, 0.2, 0.3, 0.45, 0.6, 0.8], dtype=np.float32)
_GLCM_LEVELS = 8
_GLCM_DISTANCES = (1, 2)
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "entropy")


_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
_RGB_LUT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Return the natural-log optical density ``-log((I + 1) / 256)`` of ``uint8`` intensities as ``float32``."""
    return _OD_LUT[rgb]


class HandcraftedEncoder(Encoder):
    """Colour, stain, nuclear and texture statistics of each patch, computed on the whole batch at once.

    For the whole patch and again for its centre (the inner half of the side, i.e. the spot centre against
    its surround) the encoder computes:

    - RGB mean, standard deviation and 10/50/90 % quantiles;
    - the same statistics of the H, E and DAB stain concentrations (Ruifrok & Johnston colour deconvolution with
      the stain matrix of :func:`skimage.color.rgb2hed`, on the natural optical density ``-log((I + 1) / 256)``);
    - tissue fraction (pixels that are neither white background nor black padding), nuclear fraction
      (pixels with hematoxylin above `hematoxylin_threshold`, over all pixels and over tissue) and the density
      of nucleus-like blobs (local maxima of smoothed hematoxylin, per 1,000 px);
    - texture: mean and standard deviation of the gradient magnitude, and difference-of-Gaussian energies at
      three scales of the grey optical density and at two scales of the hematoxylin channel.

    For the whole patch only: histograms of H and E, and grey-level co-occurrence statistics (contrast,
    homogeneity, energy, correlation, entropy at distances 1 and 2; :func:`skimage.feature.graycomatrix` and
    :func:`skimage.feature.graycoprops`).

    Parameters
    ----------
    patch_px
        Side in pixels the features are computed at; patches of another size are resized first. Blob and
        texture scales are in pixels at this size (96 px over a 100 um ST spot is ~1 um per pixel).
    hematoxylin_threshold
        Hematoxylin concentration (natural optical density) above which a pixel counts as nuclear.
    batch_size
        Patches processed at once per thread (small batches stay in cache; about 1 MB per patch at 96 px).
    n_jobs
        Threads that encode batches in parallel; -1 uses every core available to the process.

    Attributes
    ----------
    feature_names_
        Name of each feature column.

    Examples
    --------
    >>> import numpy as np
    >>> from omx.encoders import HandcraftedEncoder
    >>> enc = HandcraftedEncoder()
    >>> patches = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    >>> enc.transform(patches).shape == (4, enc.dim)
    True
    """

    name = "handcrafted"

    def __init__(
        self, patch_px: int = 96, *, hematoxylin_threshold: float = 1.0, batch_size: int = 32, n_jobs: int = -1
    ):
        if patch_px < 16:
            raise ValueError(f"patch_px must be at least 16, got {patch_px}.")
        self.patch_px = int(patch_px)
        self.hematoxylin_threshold = float(hematoxylin_threshold)
        self.batch_size = max(1, int(batch_size))
        self.n_jobs = int(n_jobs)
        names, _ = self._features(np.zeros((1, self.patch_px, self.patch_px, 3), dtype=np.uint8))
        self.feature_names_: list[str] = names

    @property
    def dim(self) -> int:
        """Number of features."""
        return len(self.feature_names_)

    def get_params(self) -> dict[str, Any]:
        """Return the JSON-able parameters that rebuild this encoder, with its class under ``"class"``."""
        return {
            "class": type(self).__name__,
            "patch_px": self.patch_px,
            "hematoxylin_threshold": self.hematoxylin_threshold,
            "batch_size": self.batch_size,
            "n_jobs": self.n_jobs,
        }

    def _transform(self, patches: np.ndarray) -> np.ndarray:
        chunks = [patches[i : i + self.batch_size] for i in range(0, len(patches), self.batch_size)]
        n_jobs = min(len(chunks), _n_threads(self.n_jobs))
        if n_jobs <= 1:
            out = [self._features(chunk)[1] for chunk in chunks]
        else:  # numpy and scipy.ndimage release the GIL, so threads scale
            with ThreadPoolExecutor(n_jobs) as pool:
                out = list(pool.map(lambda chunk: self._features(chunk)[1], chunks))
        return np.concatenate(out, axis=0)

    def _features(self, x: np.ndarray) -> tuple[list[str], np.ndarray]:
        b, p = x.shape[0], x.shape[1]
        feats: dict[str, np.ndarray] = {}

        # channels first, so that every reduction runs over contiguous memory
        xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        od = np.take(_OD_LUT, xt)  # (b, 3, p, p)
        rgb = np.take(_RGB_LUT, xt)
        hed = np.maximum(np.matmul(HED_FROM_RGB.T, od.reshape(b, 3, -1)), 0.0).reshape(b, 3, p, p)
        chans = np.concatenate([rgb, hed], axis=1)  # (b, 6, p, p): r, g, b, h, e, d
        gray = od.mean(1)
        tissue = (gray > 0.1) & (gray < 3.0)  # not white background, not black padding
        hema = hed[:, 0]
        nuclear = hema > self.hematoxylin_threshold
        smooth_h = ndimage.gaussian_filter(hema, sigma=(0, 1.5, 1.5), mode="reflect", truncate=2.5)
        peaks = (smooth_h == ndimage.maximum_filter(smooth_h, size=(1, 5, 5), mode="reflect")) & (
            smooth_h > self.hematoxylin_threshold
        )
        gy, gx = np.gradient(gray, axis=(1, 2))
        grad = np.sqrt(gx * gx + gy * gy)
        g1, g2, g4 = (ndimage.gaussian_filter(gray, sigma=(0, s, s), mode="reflect", truncate=2.5) for s in (1, 2, 4))
        h1 = ndimage.gaussian_filter(hema, sigma=(0, 1, 1), mode="reflect", truncate=2.5)
        bands = {"dog1": gray - g1, "dog2": g1 - g2, "dog4": g2 - g4, "hdog1": hema - h1, "hdog2": h1 - smooth_h}

        c0, c1 = p // 4, p - p // 4
        for region, lo, hi in (("", 0, p), ("centre_", c0, c1)):
            n_px = (hi - lo) ** 2
            sub = chans[:, :, lo:hi, lo:hi].reshape(b, 6, -1)
            mean = sub.mean(-1)
            std = np.sqrt(np.maximum((sub * sub).mean(-1) - mean * mean, 0.0))
            # quantiles (nearest rank) on a grid of ~600 pixels: ample for a patch and much cheaper
            step = max(1, round((hi - lo) / 24))
            grid = np.sort(chans[:, :, lo:hi:step, lo:hi:step].reshape(b, 6, -1), axis=-1)
            ranks = [int(round(q * (grid.shape[-1] - 1))) for q in _QUANTILES]
            quant = grid[..., ranks]
            for ci, ch in enumerate("rgbhed"):
                feats[f"{region}{ch}_mean"] = mean[:, ci]
                feats[f"{region}{ch}_std"] = std[:, ci]
                for qi, qq in enumerate(_QUANTILES):
                    feats[f"{region}{ch}_q{int(qq * 100)}"] = quant[:, ci, qi]
            t_frac = np.count_nonzero(tissue[:, lo:hi, lo:hi].reshape(b, -1), axis=1) / n_px
            n_frac = np.count_nonzero(nuclear[:, lo:hi, lo:hi].reshape(b, -1), axis=1) / n_px
            feats[f"{region}tissue_fraction"] = t_frac
            feats[f"{region}nuclear_fraction"] = n_frac
            feats[f"{region}nuclear_fraction_of_tissue"] = n_frac / np.maximum(t_frac, 1e-3)
            feats[f"{region}blob_density"] = np.count_nonzero(peaks[:, lo:hi, lo:hi].reshape(b, -1), axis=1) * (
                1000.0 / n_px
            )
            g = grad[:, lo:hi, lo:hi].reshape(b, -1)
            g_mean = g.mean(-1)
            feats[f"{region}gradient_mean"] = g_mean
            feats[f"{region}gradient_std"] = np.sqrt(np.maximum((g * g).mean(-1) - g_mean * g_mean, 0.0))
            for key, band in bands.items():
                sq = band[:, lo:hi, lo:hi].reshape(b, -1)
                feats[f"{region}{key}_energy"] = np.sqrt(np.einsum("ij,ij->i", sq, sq) / n_px)

        # cumulative histograms of the stain concentrations: fraction of pixels above each edge
        for ch, ci, edges in (("h", 0, _H_EDGES), ("e", 1, _E_EDGES)):
            conc = hed[:, ci].reshape(b, -1)
            for edge in edges:
                feats[f"{ch}_above_{edge:g}"] = np.count_nonzero(conc > edge, axis=1) / (p * p)

        # co-occurrence on the grey level at half resolution (distances 1 and 2 there = 2 and 4 px here)
        half_gray = gray[:, : p - p % 2, : p - p % 2].reshape(b, p // 2, 2, p // 2, 2).mean(axis=(2, 4))
        feats.update(_cooccurrence(half_gray))
        names = list(feats)
        values = np.stack([np.asarray(feats[k], dtype=np.float32) for k in names], axis=1)
        return names, values


def _n_threads(n_jobs: int) -> int:
    if n_jobs > 0:
        return n_jobs
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n_cpu = os.cpu_count() or 1
    return max(1, n_cpu + 1 + n_jobs)


def _cooccurrence(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Grey-level co-occurrence statistics of each image in ``gray`` (b, p, p), pooled over 2 directions.

    `skimage.feature.graycomatrix` counts the symmetric pairs of grey levels at each distance, horizontally and
    vertically; the two directions are summed into one matrix per distance, and `skimage.feature.graycoprops`
    scores the matrices of the whole batch at once (stacked on its angle axis).
    """
    b = gray.shape[0]
    levels = _GLCM_LEVELS
    # fixed optical-density bins so that the statistics compare across patches
    q = np.clip((gray * (levels / 1.5)).astype(np.int64), 0, levels - 1).astype(np.uint8)
    counts = np.empty((levels, levels, len(_GLCM_DISTANCES), b), dtype=np.uint32)
    for i, image in enumerate(q):
        glcm = graycomatrix(image, _GLCM_DISTANCES, (0.0, np.pi / 2), levels=levels, symmetric=True)
        counts[..., i] = glcm.sum(axis=3)
    props = {prop: graycoprops(counts, prop) for prop in _GLCM_PROPS}  # each (n_distances, b)
    return {f"glcm{d}_{prop}": props[prop][di] for di, d in enumerate(_GLCM_DISTANCES) for prop in _GLCM_PROPS}
