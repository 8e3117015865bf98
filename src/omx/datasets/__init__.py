"""Data sets: a synthetic H&E-like toy, the her2st study, a small packaged her2st sample, public 10x Visium sets.

Public data are fetched on demand with pinned checksums into ``$OMX_DATA_DIR`` (or omx's cache folder):
`registry` lists what exists, with sizes, licences and citations. The her2st readers return SpatialData in the
layout of `omx.io.read_st`; the Visium readers return what :func:`spatialdata_io.visium` reads.
`write_sample_visium`, `write_sample_visium_hd` and `sample_xenium` turn the packaged sample into 10x's own
layouts, to try omx on them with no download.
"""

from omx.datasets._her2st import download_her2st, her2st, her2st_genes
from omx.datasets._platforms import sample_xenium, write_sample_visium, write_sample_visium_hd
from omx.datasets._registry import data_dir, fetch, registry
from omx.datasets._sample import her2st_sample
from omx.datasets._toy import toy_sdata
from omx.datasets._visium import download_visium, visium_breast_block_a, visium_breast_ffpe

__all__ = [
    "data_dir",
    "download_her2st",
    "download_visium",
    "fetch",
    "her2st",
    "her2st_genes",
    "her2st_sample",
    "registry",
    "sample_xenium",
    "toy_sdata",
    "visium_breast_block_a",
    "visium_breast_ffpe",
    "write_sample_visium",
    "write_sample_visium_hd",
]
