"""Draw the omx architecture diagram used on the design page of the docs (docs/_static/design.png).

The figure shows the layers of omx and the one-way data flow between them: a SpatialData goes through
``omx.pp`` (resolve & cut), ``omx.encoders`` and the ``omx.tl`` engine, which calls a model from ``omx.models``;
``omx._schema`` writes the results back into the same SpatialData, and ``omx.get`` / ``omx.pl`` read them.

Usage (from the repository root)::

    .venv/bin/python scripts/make_design_diagram.py [--out docs/_static/design.png] [--dpi 120]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "_static" / "design.png"

FIG_W = 12.0
TITLE_PT, BODY_PT, SMALL_PT = 10.0, 8.5, 8.0
PAD = 0.11  # inner padding of a box, inches
INK = "#2b2b2b"
FLOW = "#4a4a4a"
GREY = "#8a8a8a"

# one muted colour per layer: (fill, edge)
COLOURS = {
    "data": ("#e6edf4", "#5b7083"),
    "pp": ("#e2f0e6", "#4f8a64"),
    "enc": ("#eff0dc", "#8a8a3c"),
    "tl": ("#fbecdc", "#b07a3a"),
    "models": ("#f7e4e4", "#a45a5a"),
    "schema": ("#ece4f3", "#7a5a9a"),
    "get": ("#dfeff2", "#3f8590"),
    "disk": ("#ffffff", "#8a8a8a"),
}

# layout, in inches: two rows of boxes; the top row holds the main flow, x0 and width per box
BOT_Y0, BOT_H = 0.05, 1.8
TOP_Y0, TOP_H = 2.75, 2.4
RETURN_RISE = 0.45  # height of the "written back" line above the top row
FIG_H = TOP_Y0 + TOP_H + RETURN_RISE + 0.15
TOP = {
    "data": (0.0, 1.75),
    "pp": (2.05, 2.15),
    "enc": (4.5, 1.75),
    "tl": (6.55, 2.2),
    "schema": (9.05, 2.95),
}


def box(ax, x, y, w, h, key, title, lines, dashed=False):
    """Draw a rounded box with a bold title and left-aligned body lines; return the box extent."""
    fill, edge = COLOURS[key]
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.09",
            facecolor=fill,
            edgecolor=edge,
            linewidth=1.3,
            linestyle=(0, (4, 3)) if dashed else "-",
            zorder=2,
        )
    )
    top = y + h - PAD
    ax.text(x + PAD, top, title, fontsize=TITLE_PT, fontweight="bold", color=edge, va="top", ha="left", zorder=3)
    if lines:
        ax.text(
            x + PAD,
            top - 0.27,
            "\n".join(lines),
            fontsize=BODY_PT,
            color=INK,
            va="top",
            ha="left",
            linespacing=1.32,
            zorder=3,
        )
    return x, y, w, h


def arrow(ax, start, end, colour=FLOW, dashed=False, connection="arc3", width=1.5, head=11):
    """Draw one data-flow arrow from ``start`` to ``end`` (inches)."""
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=head,
            color=colour,
            linewidth=width,
            linestyle=(0, (4, 3)) if dashed else "-",
            connectionstyle=connection,
            shrinkA=0,
            shrinkB=0,
            zorder=4,
        )
    )


def label(ax, x, y, text, colour=GREY, ha="center", va="center", size=SMALL_PT, style="italic"):
    """Small annotation on a white background, so it stays readable over lines."""
    ax.text(
        x,
        y,
        text,
        fontsize=size,
        color=colour,
        ha=ha,
        va=va,
        style=style,
        zorder=5,
        bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none"},
    )


def build_figure():
    """Build the diagram and return the matplotlib figure."""
    fig = plt.figure(figsize=(FIG_W + 0.1, FIG_H + 0.1), facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.05, FIG_W + 0.05)
    ax.set_ylim(-0.05, FIG_H + 0.05)
    ax.set_aspect("equal")
    ax.axis("off")

    y0, h = TOP_Y0, TOP_H
    b = {}
    b["data"] = box(
        ax,
        *(TOP["data"][0], y0, TOP["data"][1], h),
        "data",
        "SpatialData",
        [
            "input",
            "• H&E image (multiscale)",
            "• spots / cells (shapes)",
            "• table of counts",
            "",
            "readers:",
            "omx.io · omx.datasets ·",
            "spatialdata-io",
        ],
    )
    b["pp"] = box(
        ax,
        *(TOP["pp"][0], y0, TOP["pp"][1], h),
        "pp",
        "omx.pp — resolve & cut",
        [
            "• resolve spots against the",
            "  image: centres (px),",
            "  µm per pixel, table rows",
            "• → patches at a fixed",
            "  physical size (µm)",
            "• streamed chunk by chunk",
            "  (dask.distributed if active)",
        ],
    )
    b["enc"] = box(
        ax,
        *(TOP["enc"][0], y0, TOP["enc"][1], h),
        "enc",
        "omx.encoders",
        [
            "• patch → feature vector",
            "• handcrafted, CNN,",
            "  any torch module /",
            "  foundation model",
        ],
    )
    b["tl"] = box(
        ax,
        *(TOP["tl"][0], y0, TOP["tl"][1], h),
        "tl",
        "omx.tl — engine",
        [
            "• chooses genes & normalises",
            "  targets on TRAINING",
            "  sections only",
            "• builds a Context: groups =",
            "  sections, patients, coords",
            "  (µm), library sizes, group",
            "  statistics, meta",
            "• calls the model;",
            "  scores held-out sections",
        ],
    )
    b["schema"] = box(
        ax,
        *(TOP["schema"][0], y0, TOP["schema"][1], h),
        "schema",
        "omx._schema — one writer",
        [
            "• Key names every key",
            "• write_results checks every key first;",
            "  never overwrites unless overwrite=True",
            "• writes into the SAME SpatialData:",
            '  table.layers["omx_pred"]',
            '  new table "omx_pred" (H&E-only sections)',
            '  obsm["omx_proportions"]',
            '  obs["omx_cell_type"], table "omx_cells"',
            '  uns["omx"][key] = {function, version,',
            "    params, model, genes, written,",
            "    scores (long: section, gene, metrics),",
            "    summary}",
        ],
    )

    # bottom row: the model contract, its side output on disk, and the user-facing getters / plots
    models_x0, models_x1 = TOP["pp"][0], TOP["tl"][0] + TOP["tl"][1]
    b["models"] = box(
        ax,
        models_x0,
        BOT_Y0,
        models_x1 - models_x0,
        BOT_H,
        "models",
        "omx.models — the model contract: arrays in, arrays out",
        None,
    )
    col_w = (models_x1 - models_x0 - 2 * PAD) / 3
    columns = [
        (
            "declares (class attributes)",
            [
                'input: "features" | "patches"',
                'target: "log" | "counts"',
                "uses / requires: Context fields",
                "provides_variance",
            ],
        ),
        (
            "methods",
            [
                "fit(X, Y, context)",
                "predict(X, context)",
                "to(device)",
                "save / load",
            ],
        ),
        (
            "families",
            [
                "Ridge · CNNRegressor",
                "Contrastive (+ RetrievalBank)",
                "GraphRidge & SpatialGraph",
                "DeconvolutionModel · assign_cells",
            ],
        ),
    ]
    sub_y = BOT_Y0 + BOT_H - PAD - 0.33
    edge = COLOURS["models"][1]
    for i, (head, rows) in enumerate(columns):
        cx = models_x0 + PAD + i * col_w
        ax.text(cx, sub_y, head, fontsize=BODY_PT, fontweight="bold", color=edge, va="top", ha="left", zorder=3)
        ax.text(
            cx,
            sub_y - 0.22,
            "\n".join(rows),
            fontsize=BODY_PT,
            color=INK,
            va="top",
            ha="left",
            linespacing=1.32,
            zorder=3,
            family="DejaVu Sans Mono" if i == 1 else None,
        )
    ax.plot(
        [models_x0 + PAD, models_x1 - PAD],
        [BOT_Y0 + 0.46, BOT_Y0 + 0.46],
        color=edge,
        linewidth=0.6,
        alpha=0.5,
        zorder=3,
    )
    ax.text(
        models_x0 + PAD,
        BOT_Y0 + 0.24,
        "shared: training loop (_training) · GroupStandardizer · neighbours / propagation (graphs, Contrastive)",
        fontsize=BODY_PT,
        color=INK,
        va="center",
        ha="left",
        zorder=3,
    )

    disk_w, disk_h = 1.65, 1.3
    b["disk"] = box(
        ax,
        0.0,
        BOT_Y0 + (BOT_H - disk_h) / 2,
        disk_w,
        disk_h,
        "disk",
        "model files",
        [
            "model.save(path)",
            "omx.models.load(path)",
            "weights never inside",
            "the SpatialData",
        ],
        dashed=True,
    )
    get_x0 = TOP["schema"][0]
    b["get"] = box(
        ax,
        get_x0,
        BOT_Y0,
        FIG_W - get_x0,
        BOT_H,
        "get",
        "omx.get / omx.pl",
        [
            "• getters → AnnData / tidy",
            "  DataFrames for scanpy & squidpy",
            "  (predictions, scores, proportions)",
            "• plots take ax / show / save",
        ],
    )

    # main flow along the top row
    mid = y0 + h / 2
    order = ["data", "pp", "enc", "tl", "schema"]
    for left, right in zip(order[:-1], order[1:], strict=True):
        lx = b[left][0] + b[left][2]
        arrow(ax, (lx + 0.03, mid), (b[right][0] - 0.03, mid))

    # engine <-> model: the engine calls the model with arrays + Context and receives predictions
    tl_x, _, tl_w, _ = b["tl"]
    top_of_models = BOT_Y0 + BOT_H
    down_x, up_x = tl_x + tl_w * 0.52, tl_x + tl_w * 0.80
    arrow(ax, (down_x, y0 - 0.03), (down_x, top_of_models + 0.03))
    arrow(ax, (up_x, top_of_models + 0.03), (up_x, y0 - 0.03))
    gap_mid = (y0 + top_of_models) / 2
    label(ax, down_x - 0.06, gap_mid, "X, Y, Context", colour=FLOW, ha="right")
    label(ax, up_x + 0.06, gap_mid, "predictions", colour=FLOW, ha="left")

    # patch-input models skip the encoder: patches go straight from omx.pp to the engine
    pp_x, _, pp_w, _ = b["pp"]
    bypass_from = (pp_x + pp_w * 0.55, y0 - 0.03)
    bypass_to = (tl_x + tl_w * 0.15, y0 - 0.03)
    arrow(ax, bypass_from, bypass_to, colour=GREY, connection="arc3,rad=0.25", width=1.1, head=9)
    label(ax, (bypass_from[0] + bypass_to[0]) / 2, y0 - 0.22, 'patches, when model.input = "patches"')

    # side output: weights go to files, never into the SpatialData
    arrow(
        ax,
        (models_x0 - 0.03, BOT_Y0 + BOT_H / 2),
        (disk_w + 0.03, BOT_Y0 + BOT_H / 2),
        colour=GREY,
        dashed=True,
        width=1.1,
        head=9,
    )

    # the writer hands over to the getters / plots, which read the same SpatialData
    sx, _, sw, _ = b["schema"]
    arrow(ax, (sx + sw / 2, y0 - 0.03), (sx + sw / 2, top_of_models + 0.03))

    # results land in the same SpatialData object that came in
    line_y = y0 + h + RETURN_RISE
    src_x, dst_x = sx + sw / 2, b["data"][0] + b["data"][2] / 2
    ax.plot([src_x, src_x, dst_x], [y0 + h + 0.03, line_y, line_y], color=GREY, linewidth=1.1, zorder=1)
    arrow(ax, (dst_x, line_y), (dst_x, y0 + h + 0.03), colour=GREY, width=1.1, head=9)
    label(ax, (src_x + dst_x) / 2, line_y, "results are written back into the same SpatialData object")
    return fig


def main():
    """Parse arguments, draw the figure and save it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args()
    fig = build_figure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
