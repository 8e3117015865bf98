"""Preprocessing: resolve spots against an image and cut patches at a fixed physical resolution."""

from omx.pp._nuclei import segment_nuclei
from omx.pp._patches import extract_patches, iter_patches, patch_geometry
from omx.pp._spots import Spots, resolve_spots

__all__ = ["Spots", "extract_patches", "iter_patches", "patch_geometry", "resolve_spots", "segment_nuclei"]
