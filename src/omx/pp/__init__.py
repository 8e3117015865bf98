"""Preprocessing: resolve spots against an image, cut patches at a fixed physical resolution, encode them."""

from omx.pp._nuclei import segment_nuclei
from omx.pp._patches import extract_patches, iter_patches, patch_geometry
from omx.pp._spots import Spots, resolve_spots
from omx.pp._stream import encode

__all__ = ["Spots", "encode", "extract_patches", "iter_patches", "patch_geometry", "resolve_spots", "segment_nuclei"]
