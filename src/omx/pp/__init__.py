"""Preprocessing: spots against an image, patches at a fixed physical resolution, encoding, tissue and grids."""

from omx.pp._nuclei import segment_nuclei
from omx.pp._patches import extract_patches, iter_patches, patch_geometry
from omx.pp._spots import Spots, resolve_spots
from omx.pp._stream import encode
from omx.pp._tissue import detect_tissue, tile_grid

__all__ = [
    "Spots",
    "detect_tissue",
    "encode",
    "extract_patches",
    "iter_patches",
    "patch_geometry",
    "resolve_spots",
    "segment_nuclei",
    "tile_grid",
]
