"""Readers that return SpatialData in the omx layout.

Each section ``S`` becomes an image ``"S_he"`` (uint8 RGB, multiscale, ``Scale([mpp, mpp])`` to the coordinate
system ``S`` in microns), circles ``"S_spots"`` (centres in microns, column ``"radius"``) and its rows of one
table ``"table"`` (raw integer counts, ``obs["section"]``, ``obsm["spatial"]`` in microns). `read_st` reads the her2st
layout, `read_hest` samples of HEST-1k; Visium and other 10x technologies are read with :mod:`spatialdata_io`.
"""

from omx.io._hest import read_hest
from omx.io._st import read_st

__all__ = ["read_hest", "read_st"]
