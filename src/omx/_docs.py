"""Parameter text shared by many docstrings, written once and filled in at import by `doc_params`.

A docstring names a shared parameter by a line that holds only its placeholder, at the indentation of the
other parameter names (here in the Parameters section of ``expression``)::

    @doc_params()
    def expression(sdata, genes, *, table_key=None):
        '''Plot ...

        {sdata}
        genes
            One gene name or a list of them.
        {table_key}
        '''

Each fragment starts with the parameter's name and holds its description on the following lines, indented by
four spaces; `doc_params` indents the whole fragment to the placeholder's column. Only whole-line placeholders
are replaced, so braces elsewhere in a docstring (``{"gene": [...]}``, ``"{image_key}_nuclei"``) stay as they
are, and a placeholder naming no fragment fails at import.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

__all__ = ["FRAGMENTS", "doc_params"]

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<name>[A-Za-z_]\w*)\}[ \t]*$", re.MULTILINE)


def _fragment(text: str) -> str:
    """Strip the surrounding blank lines of a fragment written as an indented triple-quoted string."""
    return textwrap.dedent(text).strip("\n")


#: Shared parameter text, by placeholder name. Names of variants of one parameter end in a qualifier
#: (``table_key_spots``); the fragment itself starts with the parameter's own name.
FRAGMENTS: dict[str, str] = {
    name: _fragment(text)
    for name, text in {
        # ------------------------------------------------------------------------------------ data and elements
        "sdata": """
            sdata
                The SpatialData object.
            """,
        "table_key": """
            table_key
                The table of the spots (raw counts, and the results omx writes). Omitted, the one table of the
                object; tables that omx made (``"omx_cells"``, prediction tables) are left out when another one
                exists, so an object with one measured table needs no ``table_key``.
            """,
        "data_results": """
            data
                The SpatialData object omx wrote into (or one of its tables).
            """,
        "table_key_results": """
            table_key
                The measured table, when the object holds several.
            """,
        "section_results": """
            section
                Keep the rows of these sections only (values of ``obs[section_key]``).
            """,
        "encoder_features": """
            encoder
                The encoder whose features the model takes (``"handcrafted"``, an `~omx.encoders.Encoder` or a torch
                module); callers such as `omx.tl` encode patches with ``model.encoder``.
            """,
        "graph": """
            graph
                ``"knn"`` (the `n_neighbors` nearest spots), ``"radius"`` (all spots within `radius` microns) or
                ``"delaunay"`` (Delaunay triangulation, optionally cut at `radius`).
            """,
        "n_neighbors": """
            n_neighbors
                Neighbours per spot for ``graph="knn"`` (fewer in a section with fewer spots).
            """,
        "radius": """
            radius
                Radius in microns for ``graph="radius"`` (required) and ``graph="delaunay"`` (optional cut).
            """,
        # ------------------------------------------------------------------------------------ foundation backbones
        "backbone": """
            backbone
                A pathology foundation encoder as the image tower: a name (``"uni"``, ``"timm:<architecture>"``,
                ...: the published weights), an `~omx.encoders.Encoder` (e.g. ``get_encoder("uni", weights=path)``)
                or a torch module; see `~omx.encoders.get_encoder`. None: no backbone. A saved model keeps the
                encoder's parameters (its weight file by path) and rebuilds it when loaded.
            """,
        "finetune": """
            finetune
                How the backbone is used. ``"frozen"``: its features as they are; the model then takes features made
                by the backbone (``input == "features"``, ``encoder`` is the backbone), which `omx.tl` computes once
                and caches. ``"last_blocks"``: the last `n_blocks` transformer blocks and the final norm train with
                the model. ``"lora"``: low-rank adapters of rank `lora_rank` on the attention ``qkv`` and ``proj``
                layers of every block train, the backbone's own weights staying frozen; the adapters start at zero,
                so training starts from the backbone's function. The two trained modes take patches at the
                backbone's ``patch_px`` (and `mpp`, its native resolution), normalised as the backbone expects; they
                need a vision transformer with ``.blocks`` (timm's), run in bfloat16 on CUDA and are meant for a
                GPU. Everything else in the backbone is frozen and in eval mode, and only the trained tensors are
                saved with the model.
            """,
        "n_blocks": """
            n_blocks
                Transformer blocks trained with ``finetune="last_blocks"`` (at most the backbone's depth).
            """,
        "lora_rank": """
            lora_rank
                Rank of the adapters with ``finetune="lora"``.
            """,
        "gradient_checkpointing": """
            gradient_checkpointing
                With a trained backbone: recompute the activations of the blocks that train in the backward pass
                instead of storing them (less GPU memory, about a third more compute).
            """,
        "table_key_spots": """
            table_key
                The table annotating the spots; omitted, the one table that annotates ``shapes_key`` (or none), leaving
                out the tables omx made (predictions, nuclei).
            """,
        "image_key": """
            image_key
                The H&E image; may be omitted when exactly one image shares a coordinate system with the spots.
            """,
        "shapes_key": """
            shapes_key
                The spots (circles with a ``radius`` column, or polygons); may be omitted when the table annotates
                exactly one shapes element, or the object has exactly one.
            """,
        "section_key": """
            section_key
                The obs column naming each spot's section; when the table has no column ``"section"`` (the
                default), the table's region column, one section per shapes element (as spatialdata-io's readers
                make them: a Visium sample's spots, a Visium HD bin size, Xenium's cells).
            """,
        "mpp": """
            mpp
                Microns per pixel of the image's finest level, when its coordinate system is not in microns.
            """,
        "layer": """
            layer
                Table layer with the raw counts; ``X`` when omitted.
            """,
        "genes": """
            genes
                Genes to predict; all must be in the table. Omitted: the genes detected in at least 1 % of the
                training spots.
            """,
        "n_top_genes": """
            n_top_genes
                With ``genes=None``, keep only this many of the most expressed genes of the training sections
                (mean log-normalised expression over the training spots only).
            """,
        "min_counts": """
            min_counts
                Spots with fewer counts are left out of training and of the scores (their predictions are still
                written).
            """,
        "target_norm": """
            target_norm
                ``"section"`` standardises each gene within each training section (recommended when library
                depths differ), ``"none"`` pools log-normalised values as they are.
            """,
        # ----------------------------------------------------------------------------------------------- patches
        "size_um": """
            size_um
                Side of the square patch around each spot, in microns. Omitted: ``patch_px * mpp`` for an encoder
                with a native resolution (foundation models: 224 px at 0.5 um/px, 112 um), else the spot diameter.
            """,
        "context": """
            context
                Patch sizes as multiples of ``size_um``: feature models concatenate the features of each, in this
                order; patch models see one patch spanning the largest. Omitted: ``(1,)`` for an encoder with a
                native resolution, else ``(1, 2, 3)``.
            """,
        "data_spots": """
            data
                A SpatialData object (then ``resolve_kwargs`` go to :func:`omx.pp.resolve_spots`) or resolved
                spots (:class:`omx.pp.Spots`).
            """,
        "resolve_kwargs": """
            **resolve_kwargs
                ``image_key``, ``shapes_key``, ``table_key``, ``mpp``, ... for :func:`omx.pp.resolve_spots`.
            """,
        # --------------------------------------------------------------------------------------------- io, data
        "sections": """
            sections
                Sections to read, one name (``"C2"``) or a list (``["C2", "C3"]``); None reads every section
                found.
            """,
        "genes_read": """
            genes
                Keep only these genes, in this order, e.g. ``omx.datasets.her2st_genes()`` (the 785-gene panel of
                the published benchmarks). Genes that no section measured are dropped with an `omx.OmxWarning`.
                None keeps the union of the genes of all sections (a gene absent from a section counts 0 there).
            """,
        # ------------------------------------------------------------------------------------- results and runs
        "key_added": """
            key_added
                Where the results go (see Returns); the same name keys the entry ``uns["omx"][key_added]``.
            """,
        "overwrite": """
            overwrite
                Replace existing results under ``key_added``; otherwise a `KeyError` names the key that is taken.
            """,
        "inplace": """
            inplace
                Write the results into ``sdata`` and return None; otherwise return them and leave ``sdata`` as
                it was.
            """,
        "seed": """
            seed
                Random seed; the same seed gives the same result on the CPU.
            """,
        "device": """
            device
                ``"auto"`` (CUDA when present, else the CPU), ``"cpu"`` or ``"cuda"``; results agree up to float
                noise.
            """,
        "show_progress_bar": """
            show_progress_bar
                Show progress bars (`tqdm.auto`) over long loops.
            """,
        # --------------------------------------------------------------------------------------------- downloads
        "progressbar": """
            progressbar
                Show a progress bar per download.
            """,
        "timeout": """
            timeout
                Seconds to wait for the server.
            """,
        "fullres_image": """
            fullres_image
                Also fetch the full-resolution H&E image (the largest file by far); without it only the hires and
                lowres images of ``spatial/`` are there.
            """,
        "dest_sample": """
            dest
                Folder to write into (created if needed); ``<dest>/<section>`` must not exist yet.
            """,
        "section_sample": """
            section
                ``"C2"``, ``"C3"`` or ``"C4"``.
            """,
        # ----------------------------------------------------------------------------------------------- plots
        "section_key_pl": """
            section_key
                The obs column naming each spot's section; when the table has no column ``"section"`` (the
                default), the table's region column, one section per shapes element.
            """,
        "section_pl": """
            section
                The section to draw, a value of ``obs[section_key]``; may be omitted when the results cover
                exactly one section.
            """,
        "show": """
            show
                Show the figure (`matplotlib.pyplot.show`) and return None. Omitted, ``omx.settings.autoshow``
                (True unless changed). ``show=False`` returns the axes to draw on.
            """,
        "save": """
            save
                Save the figure (150 dpi, tight bounding box): a path (its suffix picks the format), or True for
                ``omx.settings.figdir / "<function name>.png"``. Folders are created as needed.
            """,
    }.items()
}


def doc_params(**fragments: str) -> Callable[[T], T]:
    r"""Fill the whole-line ``{name}`` placeholders of a docstring with shared parameter text.

    Placeholders name entries of `FRAGMENTS`; keyword arguments add fragments for this docstring or replace
    shared ones (``@doc_params(ax="ax\n    One axes to draw into.")``). The original docstring is kept as
    ``__orig_doc__``, as scanpy's ``_doc_params`` does.
    """
    known = {**FRAGMENTS, **{name: _fragment(text) for name, text in fragments.items()}}

    def fill(match: re.Match) -> str:
        name, indent = match["name"], match["indent"]
        if name not in known:
            raise KeyError(f"No shared docstring fragment {name!r}; known: {sorted(known)}.")
        return "\n".join(indent + line if line else line for line in known[name].splitlines())

    def decorate(obj: T) -> T:
        doc = obj.__doc__
        if doc:
            obj.__orig_doc__ = doc
            obj.__doc__ = _PLACEHOLDER.sub(fill, doc)
        return obj

    return decorate
