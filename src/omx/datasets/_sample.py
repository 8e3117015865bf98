"""A small real sample of her2st packaged with omx (patient C, sections C2, C3, C4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from omx.datasets._her2st import _SAMPLE_DIR
from omx.io import read_st

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["her2st_sample"]


def her2st_sample(sections: str | Sequence[str] | None = None) -> SpatialData:
    """Read the small her2st sample that ships with omx (no download).

    Sections C2, C3 and C4 (three serial sections of patient C) of Andersson et al., Nat Commun 12, 6012
    (2021), licence CC BY 4.0, kept in the study's own layout: images cropped to the spots plus a 300 um margin
    and downsampled to about 2 um per pixel (JPEG), counts restricted to the 785-gene panel
    (`her2st_genes`), stereoscope proportions and expression clusters as published. ``scripts/make_sample.py``
    in the omx repository rebuilds it from the full study.

    Parameters
    ----------
    sections
        Sections to read; None reads all three.

    Returns
    -------
    SpatialData in the layout of `omx.io.read_st` (images ``"C2_he"``, ..., circles ``"C2_spots"``, ...,
    one ``"table"`` of raw counts).
    """
    return read_st(_SAMPLE_DIR, sections)
