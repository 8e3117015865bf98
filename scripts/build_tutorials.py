"""Build the tutorial notebooks from their cell sources and execute them, so they are committed with outputs.

python scripts/build_tutorials.py            # writes and runs tutorials/*.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

QUICKSTART = [
    (
        "md",
        """# Quickstart: predict expression from H&E

This tutorial fits an image-to-expression model on two sections of the packaged her2st sample (HER2-positive
breast tumour, Spatial Transcriptomics; Andersson et al., *Nat Commun* 12, 6012 (2021), CC BY 4.0), predicts a
third section from its H&E alone, and compares the prediction with what was measured. It runs offline in
well under a minute on a laptop CPU.""",
    ),
    ("code", "import omx\n\nsdata = omx.datasets.her2st_sample()\nsdata"),
    (
        "md",
        """One SpatialData object holds, per section, the H&E image (`C2_he`, a multiscale image in a coordinate
system in microns), the spots (`C2_spots`, circles of their true 50 um radius) and one table of raw counts that
annotates all spots.""",
    ),
    ("code", "table = sdata.tables['table']\ntable.obs[['section', 'patient']].value_counts()"),
    (
        "md",
        """## Fit on C2 and C3, predict C4

`fit_predict` cuts patches of a fixed physical size around each spot (and around larger context windows),
encodes them, fits the model on the training sections only, and writes the predictions for C4 into
`table.layers['omx_pred']` on the scale log1p(counts / total x 1e4). Rows of other sections stay NaN.""",
    ),
    (
        "code",
        "model = omx.tl.fit_predict(sdata, train=['C2', 'C3'], predict='C4', model='ridge', show_progress_bar=False)\n"
        "model",
    ),
    (
        "code",
        "summary = table.uns['omx']['omx_pred']['summary']['C4']\n"
        "import pandas as pd\n\npd.DataFrame(summary).T.round(3)",
    ),
    (
        "md",
        """The mean per-gene Pearson r is computed on the held-out section over all genes, the 50 most
expressed genes of that section, and the 50 most variable genes of the *training* sections (chosen without
looking at the held-out section).""",
    ),
    ("code", "omx.pl.gene_scores(table, key='omx_pred', section='C4');"),
    ("code", "omx.pl.expression(sdata, genes=['GNAS', 'SCD'], section='C4');"),
    (
        "md",
        """## Save the model, predict a section that has only H&E

Model weights never go into the SpatialData. Save the model and apply it to any other SpatialData with an H&E
image and spots; spots without a measured table get a new table `omx_pred`.""",
    ),
    (
        "code",
        "import tempfile\n\npath = tempfile.mkdtemp() + '/ridge'\nmodel.save(path)\n"
        "pred = omx.tl.predict_expression(sdata, path, shapes_key='C4_spots', inplace=False, show_progress_bar=False)\n"
        "pred",
    ),
    (
        "md",
        """## Evaluate without leakage

`cross_validate` holds out each section in turn; the genes' normalisation statistics and the model are fitted
inside each fold, on the training sections only.""",
    ),
    ("code", "cv = omx.tl.cross_validate(sdata, model='ridge', show_progress_bar=False)\ncv.round(3)"),
    (
        "md",
        """## Use a pathology foundation model

The image representation decides accuracy, and pathology foundation models (UNI, UNI2-h, H-optimus, Virchow2,
Phikon-v2, Prov-GigaPath, CONCH) are the best ones available. omx knows their architectures, preprocessing,
pooling and native resolution by name:""",
    ),
    ("code", "omx.encoders.describe()[['hub_id', 'dim', 'patch_px', 'mpp', 'pooling', 'licence']]"),
    (
        "md",
        """With real weights, download the file once on a machine with internet access (most are gated: accept the
terms on the hub page first), e.g. `huggingface-cli download MahmoodLab/UNI pytorch_model.bin --local-dir
weights/MahmoodLab/UNI`, and pass it:
`omx.encoders.get_encoder("uni", weights="weights/MahmoodLab/UNI/pytorch_model.bin")`.

This tutorial runs offline, so it goes the same way with a small stand-in: a ViT-Tiny with random weights,
saved to a safetensors file and loaded back through `weights=`. Its features carry no meaning (omx warns about
that); the path is the one a real model takes. `mpp=0.5` gives it the native resolution of the pathology models:
patches of 224 px over 112 um, whatever the slide's resolution.""",
    ),
    (
        "code",
        """import tempfile
import warnings

from safetensors.torch import save_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore", omx.OmxWarning)  # random weights: for this offline demonstration only
    stand_in = omx.encoders.get_encoder("timm:vit_tiny_patch16_224", weights="random")
weights = tempfile.mkdtemp() + "/vit_tiny.safetensors"
save_file(stand_in.module.state_dict(), weights)

encoder = omx.encoders.get_encoder("timm:vit_tiny_patch16_224", weights=weights, mpp=0.5)
encoder""",
    ),
    (
        "md",
        """Encode every section once: the features go to `table.obsm['X_omx_<encoder>']`, described in
`table.uns['omx']` (encoder, weights, patch geometry). Fitting, prediction and cross-validation with the same
encoder and geometry take them from there instead of running the network again; on a GPU the encoder runs in
bfloat16 while background threads cut the next patches.""",
    ),
    (
        "code",
        """for section in ['C2', 'C3', 'C4']:
    omx.pp.encode(sdata, encoder, shapes_key=f'{section}_spots', image_key=f'{section}_he', show_progress_bar=False)
table.uns['omx']['X_omx_vit_tiny_patch16_224']['regions'], table.obsm['X_omx_vit_tiny_patch16_224'].shape""",
    ),
    (
        "code",
        """fm = omx.tl.fit_predict(
    sdata, train=['C2', 'C3'], predict='C4', model=omx.models.Ridge(encoder=encoder, show_progress_bar=False),
    key_added='omx_pred_vit', show_progress_bar=False,
)
fm.meta_['size_um'], fm.meta_['context']""",
    ),
]

HER2ST = [
    (
        "md",
        """# Compare models on her2st, without leakage

Four sections of the HER2-positive breast cancer study of Andersson et al., *Nat Commun* 12, 6012 (2021)
(CC BY 4.0): C2, C3 and C4 are serial sections of one tumour (patient C), B4 comes from another patient.
This tutorial needs a local copy of the study (`omx.datasets.her2st` says where to put it) and runs in a
few minutes on a laptop CPU.

Each fold of `cross_validate` holds out one group (a section, or a patient) and fits everything on the rest:
the per-section normalisation statistics of the targets, the choice of genes, the ridge penalty and the number
of target components, the CNN's early stopping. Nothing about the held-out section is seen before it is
scored.""",
    ),
    (
        "code",
        "import warnings\n\nimport pandas as pd\n\nimport omx\n\nwarnings.filterwarnings('ignore', message='zarr')\n"
        "sdata = omx.datasets.her2st(sections=['C2', 'C3', 'C4', 'B4'])\n"
        "genes = omx.datasets.her2st_genes()  # the 785-gene panel of the published methods\n"
        "sdata.tables['table']",
    ),
    (
        "md",
        """## Leave one section out

Ridge regression on handcrafted colour, stain and texture features of the spot and its surroundings, and a
small CNN trained from scratch on the patches (capped at 15 epochs here to keep the tutorial short).""",
    ),
    (
        "code",
        "models = {'ridge': 'ridge', 'cnn': omx.models.CNNRegressor(epochs=15, show_progress_bar=False)}\n"
        "results = {}\n"
        "for name, model in models.items():\n"
        "    results[name] = omx.tl.cross_validate(\n"
        "        sdata, model=model, genes=genes, key_added=f'cv_{name}', show_progress_bar=False\n"
        "    )\n"
        "cols = ['pearson_all', 'pearson_top_expressed', 'pearson_top_variable', 'fit_s']\n"
        "pd.concat(results, names=['model']).set_index('section', append=True)[cols].round(3)",
    ),
    (
        "md",
        """`pearson_all` is the mean per-gene Pearson r over the panel, `pearson_top_expressed` over the 50 genes
most expressed in the held-out section, and `pearson_top_variable` over the 50 genes most variable in the
*training* sections. B4's library is about 15 times shallower than C's: its measured expression is so noisy
that even a perfect predictor would score low there, and its highly expressed genes are immunoglobulins that
the C sections do not teach. Read scores section by section.""",
    ),
    ("code", "omx.pl.gene_scores(sdata.tables['table'], key='cv_ridge', section='C3');"),
    (
        "md",
        """## Leave one patient out

With patients known, hold out a whole patient: train on C2, C3 and C4, test on B4.""",
    ),
    (
        "code",
        "omx.tl.cross_validate(\n"
        "    sdata, groups='patient', test=['B'], genes=genes, key_added=None, show_progress_bar=False\n"
        ")[['section', 'train', *cols]].round(3)",
    ),
    (
        "md",
        """## Where the model is right

The out-of-fold predictions are in `table.layers['cv_ridge']`, so every spot can be drawn with the prediction
of the model that did not see its section.""",
    ),
    ("code", "omx.pl.expression(sdata, ['GNAS', 'SCD', 'MGP'], layer='cv_ridge', section='C4', ncols=1);"),
]

SCVERSE = [
    (
        "md",
        """# Predicted expression in scanpy and squidpy

omx writes predictions where scverse tools look for them. This tutorial predicts a section from its H&E alone,
then clusters the prediction with scanpy and looks for spatially variable genes with squidpy's Moran's I,
and compares both with what was measured on that section. It uses the packaged her2st sample and runs offline
in about a minute.""",
    ),
    (
        "code",
        "import warnings\n\nimport numpy as np\nimport pandas as pd\nimport scanpy as sc\nimport squidpy as sq\n\n"
        "import omx\n\nwarnings.filterwarnings('ignore')\nsdata = omx.datasets.her2st_sample()",
    ),
    (
        "md",
        """Treat C4 as an H&E-only section: predict it from its image with a model fitted on C2 and C3. Since C4
was measured, the predictions land in `table.layers['omx_pred']`; a section without a table would get a new
table `omx_pred` annotating its spots instead. Either way, `omx.get.predictions` hands them back as an AnnData of
the predicted spots and genes only: predictions in `X` (never negative), the measured expression of the same
spots on the same scale in `layers['observed']`, per-gene scores on the held-out section in `var`, and spot
centres in microns in `obsm['spatial']`.""",
    ),
    (
        "code",
        "omx.tl.fit_predict(sdata, train=['C2', 'C3'], predict='C4', show_progress_bar=False)\n"
        "pred = omx.get.predictions(sdata, 'omx_pred', section='C4')\n"
        "genes = list(pred.var_names)\n"
        "meas = pred.copy()  # the measured expression of the same spots and genes, on the same scale\n"
        "meas.X = meas.layers['observed']\n"
        "pred",
    ),
    (
        "md",
        """## Cluster the predicted expression

The predicted AnnData is ordinary scanpy input: PCA, a neighbour graph and Leiden clusters. The same on the
measured expression gives a reference; the adjusted Rand index says how well the two partitions agree.""",
    ),
    (
        "code",
        "for ad in (pred, meas):\n"
        "    sc.pp.pca(ad, n_comps=10)\n"
        "    sc.pp.neighbors(ad, n_neighbors=10)\n"
        "    sc.tl.leiden(ad, resolution=0.5, flavor='igraph', n_iterations=2, random_state=0)\n"
        "from sklearn.metrics import adjusted_rand_score\n\n"
        "print('clusters (predicted, measured):', pred.obs['leiden'].nunique(), meas.obs['leiden'].nunique())\n"
        "print('adjusted Rand index:', round(adjusted_rand_score(pred.obs['leiden'], meas.obs['leiden']), 3))",
    ),
    (
        "code",
        "import matplotlib.pyplot as plt\n\n"
        "fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout='constrained')\n"
        "for ax, ad, title in zip(axes, (pred, meas), ('predicted from H&E', 'measured'), strict=True):\n"
        "    sc.pl.embedding(ad, basis='spatial', color='leiden', ax=ax, show=False, title=title, size=120)\n"
        "    ax.invert_yaxis()\n"
        "    ax.set_aspect('equal')",
    ),
    (
        "md",
        """## Spatially variable genes with squidpy

Moran's I of each gene over the spot graph (six nearest spots), on the prediction and on the measurement.""",
    ),
    (
        "code",
        "for ad in (pred, meas):\n"
        "    sq.gr.spatial_neighbors(ad, coord_type='generic', n_neighs=6)\n"
        "    sq.gr.spatial_autocorr(ad, mode='moran', genes=list(genes), n_perms=None, n_jobs=1)\n"
        "moran = pd.DataFrame({'predicted': pred.uns['moranI']['I'], 'measured': meas.uns['moranI']['I']}).dropna()\n"
        "moran['pearson_r'] = pred.var['pearson']  # per-gene scores on the held-out section\n"
        "moran.corr(method='spearman').round(2)",
    ),
    (
        "md",
        """Read this table with care. The predicted Moran's I does not rank genes like the measured one (Spearman
near 0): a ridge model predicts every gene through a handful of shared image-derived components, so every
predicted gene is smooth and its Moran's I reflects those components rather than the gene. The measured Moran's
I, on the other hand, tracks how well each gene is predicted (Spearman about 0.65): the H&E predicts the genes
whose expression follows the tissue's structure. On an H&E-only section, use the predicted expression for
spatial domains and programmes (the clusters above), and the per-gene scores from held-out measured sections
to decide which genes to trust; do not rank genes by the Moran's I of their predictions.""",
    ),
    (
        "code",
        "fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout='constrained')\n"
        "moran.plot.scatter(x='measured', y='predicted', s=8, alpha=0.6, ax=axes[0])\n"
        'axes[0].set_title("Moran\'s I per gene, C4")\n'
        "moran.plot.scatter(x='measured', y='pearson_r', s=8, alpha=0.6, ax=axes[1])\n"
        'axes[1].set_title("Measured Moran\'s I vs prediction accuracy");',
    ),
]

DECONV = [
    (
        "md",
        """# Cell types: nuclei, deconvolution and single-cell layers

Spots of Spatial Transcriptomics hold tens of cells. This tutorial finds the nuclei in the H&E, estimates the
cell-type proportions of each spot of a held-out section with omx's Bayesian deconvolution, gives every nucleus
a cell type and an imputed expression profile, and clusters those pseudo single cells with scanpy. It uses the
packaged her2st sample (Andersson et al., *Nat Commun* 12, 6012 (2021), CC BY 4.0) and runs offline in about
a minute.""",
    ),
    (
        "code",
        "import warnings\n\nimport numpy as np\nimport pandas as pd\nimport scanpy as sc\n\nimport omx\n\n"
        "warnings.filterwarnings('ignore')\nsdata = omx.datasets.her2st_sample()",
    ),
    (
        "md",
        """## A reference from the training sections

There is no single-cell atlas in the sample, but the study published stereoscope proportions per spot. Cell-type
signatures fitted on C2 and C3 (a Poisson regression of each gene's counts on the spots' proportions, each section
weighing the same) serve as the reference; C4 is held out and deconvolved from its counts alone. With training
sections from several patients, `signatures_from_proportions` keeps the genes whose cell-type pattern carries
over from one patient to another; here both sections come from one patient, so it keeps the most expressed.

The reference also carries an expression prior: a ridge regression from each spot's normalised counts to its
proportions, learnt on the training spots. The deconvolution centres each spot's prior on what this regression
predicts, with a strength (and a choice of per-gene or common dispersion) that leave-one-section-out
cross-validation over C2 and C3 picked; `reference.uns['omx_prior']` holds the choice and the scores.
`prior=False` (here) or `prior_strength=0` (in `deconvolve`) leaves it out.

With a single-cell atlas instead, pass it as `reference=` with its cell-type column as `labels_key=` (and its
samples or donors as `batch_key=`): the signatures are then fitted by a negative-binomial model of the cells.""",
    ),
    (
        "code",
        "reference = omx.tl.signatures_from_proportions(\n"
        "    sdata, key='stereoscope_major', sections=['C2', 'C3'], show_progress_bar=False\n"
        ")\n"
        "{k: reference.uns['omx_prior'][k] for k in ('strength', 'dispersion')}",
    ),
    (
        "md",
        """## Nuclei from the H&E

`segment_nuclei` separates the haematoxylin stain, thresholds it and splits touching nuclei with a watershed,
chunk by chunk. The sample is downsampled to 2 um per pixel, so nuclei are only a few pixels across here; on a
full-resolution scan they are far better resolved. The count of nuclei per spot becomes the prior on the number
of cells in the deconvolution.""",
    ),
    (
        "code",
        "omx.pp.segment_nuclei(sdata, image_key='C4_he', show_progress_bar=False)\n"
        "table = sdata.tables['table']\n"
        "table.obs.loc[table.obs['section'] == 'C4', 'omx_n_nuclei'].describe()",
    ),
    ("md", "## Deconvolve the held-out section"),
    (
        "code",
        "omx.tl.deconvolve(sdata, reference, sections='C4', platform_sd=0, show_progress_bar=False)\n"
        "ours = omx.get.proportions(sdata, section='C4')  # one row per spot and cell type, with credible bounds\n"
        "published = table.obsm['stereoscope_major'].stack().rename('published')\n"
        "ours = ours.join(published, on=['spot', 'cell_type'])\n"
        "ours.groupby('cell_type')[['proportion', 'published']].corr().xs('proportion', level=1)['published']"
        ".rename('Pearson r').round(2)",
    ),
    (
        "md",
        """Agreement with the published stereoscope estimate, per cell type, over the spots of C4 (those proportions
are themselves an estimate, not ground truth). `platform_sd=0` leaves out the per-gene platform effect, as the
signatures come from the same platform as the spots; with a single-cell reference keep the default.

`omx.get.proportions` returns the proportions (the posterior mode of each spot's cells per type) as a tidy table
with their 90 % credible bounds (`q05`, `q95`); in the table they live in `obsm['omx_proportions']` (bounds in
`obsm['omx_proportions_q05']` and `['omx_proportions_q95']`) and the most abundant type in `obs['omx_cell_type']`.
The intervals are calibrated: on simulated spots with known proportions the 90 % intervals hold the truth about
90 % of the time. A type with less than half a cell in a posterior draw counts as absent there, so the interval
of a type that may be missing from a spot starts at 0.""",
    ),
    (
        "md",
        """## A cell type for every nucleus

`assign_cells` splits each spot's nuclei among the cell types in proportion to the spot's composition, using
nuclear morphology to decide which nucleus gets which type, and shares the spot's counts among its cells.""",
    ),
    ("code", "omx.tl.assign_cells(sdata)\ncells = sdata.tables['omx_cells']\ncells.obs['cell_type'].value_counts()"),
    ("code", "omx.pl.cell_types(sdata, section='C4', cell_types=['Epithelial', 'CAFs', 'Plasma Cells'], ncols=4);"),
    (
        "md",
        """Each type's proportion is followed by the width of its 90 % credible interval: where it is wide, the spot's
counts say little about that type.""",
    ),
    (
        "md",
        """## Pseudo single cells in scanpy

The nuclei inside spots carry imputed expression in `X`: a layer scanpy can normalise, embed and cluster like
any single-cell data.""",
    ),
    (
        "code",
        "inside = cells[cells.obs['spot_index'] >= 0].copy()\n"
        "sc.pp.normalize_total(inside, target_sum=1e4)\nsc.pp.log1p(inside)\n"
        "sc.pp.pca(inside, n_comps=15)\nsc.pp.neighbors(inside)\nsc.tl.umap(inside, random_state=0)\n"
        "sc.pl.umap(inside, color='cell_type', size=8)",
    ),
    (
        "md",
        """## Cell types from the H&E alone

`predict_proportions` learns proportions from the image of training sections (image features and the morphology
of their nuclei) and predicts them on a section from its H&E alone; every nucleus of that section also gets an
image-only type and the probability of it. It needs the nuclei of every section it uses; a fresh copy of the
sample keeps this apart from the deconvolution above.""",
    ),
    (
        "code",
        "he = omx.datasets.her2st_sample()\n"
        "for image in ('C2_he', 'C3_he', 'C4_he'):\n"
        "    omx.pp.segment_nuclei(he, image_key=image, show_progress_bar=False)\n"
        "omx.tl.predict_proportions(he, train=['C2', 'C3'], predict='C4', key='stereoscope_major', "
        "show_progress_bar=False)\n"
        "t = he.tables['table']\n"
        "c4 = (t.obs['section'] == 'C4').to_numpy()\n"
        "r = t.obsm['omx_proportions'][c4].corrwith(t.obsm['stereoscope_major'][c4])\n"
        "print(r.round(2).rename('Pearson r, H&E only').to_string())\n"
        "nuclei = he.tables['omx_cells'].obs\n"
        "nuclei.loc[nuclei['omx_image_type'].notna(), ['omx_image_type', 'omx_image_type_confidence']].describe("
        "include='all')",
    ),
    (
        "md",
        """On held-out her2st sections the image-only proportions beat both predicting the training average and
deconvolving image-predicted expression (`benchmarks/deconvolution.py image`); they stay far less accurate than
deconvolving measured counts, and each nucleus's own type is uncertain (see its confidence).""",
    ),
]

HE_ONLY = [
    (
        "md",
        """# Expression on an H&E-only slide

Most slides have an H&E image and nothing else. This tutorial fits a model on sections whose spots were
measured and predicts expression over the whole tissue of another slide from its image alone: on a Visium-like
grid of spots, and on bins of 25 um, finer than any spot it was trained on. It then clusters the predicted
bins with scanpy, and shows what changes when the slide's own spots were measured after all.

It uses the packaged her2st sample (HER2-positive breast tumour, Spatial Transcriptomics; Andersson et al.,
*Nat Commun* 12, 6012 (2021), CC BY 4.0): three serial sections of one tumour, C2, C3 and C4, at about 2 um per
pixel. It runs offline, in about three minutes on two CPU cores.""",
    ),
    (
        "md",
        """`omx.settings.feature_store` names a folder where omx keeps the image features of units that no table
annotates (grid tiles, bins), keyed by the image, the units, the encoder and the patch geometry. A later call on
the same units reads them instead of encoding the image again; below, the bins are predicted twice.""",
    ),
    (
        "code",
        """import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import spatialdata_plot  # noqa: F401  (adds sdata.pl)

import omx

omx.settings.feature_store = tempfile.mkdtemp()
sdata = omx.datasets.her2st_sample()""",
    ),
    (
        "md",
        """## Fit on the measured sections

The spots of C2 and C3 have counts: fit a ridge on the handcrafted image features of their patches (the spot
and windows two and three times its size around it). `fit_predict` also predicts C4's spots and scores the
prediction against their counts. On your own data, a held-out measured section like this is how you learn which
genes the model predicts well before you trust it on slides with H&E only.

From here on, pretend that C4's spots do not exist: apart from the scores above and the part on anchored
super-resolution, nothing below reads them or their counts, only C4's H&E image `C4_he`.""",
    ),
    (
        "code",
        """model = omx.tl.fit_predict(sdata, train=['C2', 'C3'], predict='C4', show_progress_bar=False)
scores = omx.get.scores(sdata, 'omx_pred').set_index('gene')
genes = ['FASN', 'FN1', 'IGKC']
print(f"mean Pearson r over {len(scores)} genes: {scores['pearson'].mean():.3f}")
scores.loc[genes, ['pearson', 'spearman']].round(2)""",
    ),
    (
        "md",
        """ERBB2, the gene amplified in these tumours, is not among the 785 genes of the sample's panel. The maps
below follow three genes that the model predicts well on C4 and that mark the tumour's main compartments:
FASN (fatty acid synthase, high in HER2-positive tumour cells), FN1 (fibronectin, in the stroma) and IGKC
(immunoglobulin kappa, from plasma cells).

## Find the tissue

`detect_tissue` reads one low-resolution view of the image, separates stain from glass and adds the tissue as
polygons, `sdata.shapes['C4_he_tissue']`, aligned with the image in every coordinate system.""",
    ),
    ("code", "omx.pp.detect_tissue(sdata, image_key='C4_he')\nsdata.shapes['C4_he_tissue']"),
    (
        "code",
        """(
    sdata.pl.render_images('C4_he')
    .pl.render_shapes('C4_he_tissue', fill_alpha=0, outline_alpha=1, outline_color='red', outline_width=1.5)
    .pl.show(coordinate_systems='C4', figsize=(5, 4), title='C4: tissue outline')
)""",
    ),
    (
        "md",
        """The axes are in microns, the units of C4's coordinate system. To pan and zoom over the image and its
elements interactively, open the same object in napari-spatialdata (`Interactive(sdata)`).

## Predict a Visium-like grid

`tile_grid` lays circles of 55 um on a hexagonal lattice 100 um apart, Visium's layout, and keeps those whose
centre lies in the tissue. `predict_expression` applies the fitted model to them and, as no table annotates these
circles, writes a new table `omx_pred_hex`: one row per circle, predictions on the scale log1p(counts / total x
1e4) in `X`. The model cuts the patches it was trained on, an ST spot of 100 um with its context, around each
centre: the grid decides where expression is predicted, the training spots what area a prediction stands for.""",
    ),
    (
        "code",
        """omx.pp.tile_grid(sdata, image_key='C4_he', kind='hex', size_um=55, within='tissue')
omx.tl.predict_expression(
    sdata, model, shapes_key='C4_he_hex_55um', key_added='omx_pred_hex', show_progress_bar=False
)
sdata.tables['omx_pred_hex']""",
    ),
    ("code", "omx.pl.prediction_map(sdata, genes, table_key='omx_pred_hex', ncols=3)"),
    (
        "md",
        """## Super-resolution: bins finer than the spots

`super_resolve` predicts units smaller than the training spots. Each training spot of C2 and C3 is covered by
square bins of 25 um (about 12 per spot); the model maps the image features of one bin (and its
surroundings) to expression, and is fitted so that the mean of its predictions over the bins inside a spot
matches that spot's measured expression. The model is linear in the features, so this holds exactly. It then
predicts every bin of a grid over C4's tissue from the image alone.""",
    ),
    (
        "code",
        """omx.pp.tile_grid(sdata, image_key='C4_he', kind='square', size_um=25, within='tissue')
fine_model = omx.tl.super_resolve(
    sdata, train=['C2', 'C3'], predict='C4_he_square_25um', bin_um=25, key_added='omx_superres',
    show_progress_bar=False,
)
sdata.tables['omx_superres']""",
    ),
    (
        "md",
        """### Anchored to measured spots

Now suppose C4's spots had been measured, as they were. With `predict=['C4']` (C4 as a measured section) and
the same bins as its fine units, each bin inside a spot gets that spot's measured value plus the image's detail:
how far the bin's own prediction lies from the mean prediction of the spot's bins, scaled per gene by how well
the image predicts that gene on the training sections (about 0 where it does not) and by how much of the bins'
variation survives averaging over a spot (a single small bin's prediction is noisier than a spot's). Bins between
spots get the same from the nearby spots, smoothly interpolated.

The two maps answer different questions. The image-only map is all you have on an H&E-only slide: every
value, at every scale, comes from the image, and is as good as the model. The anchored map keeps what was
measured: averaged over the bins inside a spot, it gives back the spot's measured expression by construction,
and the image only distributes that expression within and between the spots. Use it to sharpen a measured
section, not to predict a new one.""",
    ),
    (
        "code",
        """omx.tl.super_resolve(
    sdata, train=['C2', 'C3'], predict='C4', fine={'C4': 'C4_he_square_25um'}, bin_um=25,
    key_added='omx_superres_anchored', show_progress_bar=False,
)
# check: the anchored bins inside each spot average to the spot's measured expression
anchored = omx.get.predictions(sdata, 'omx_superres_anchored')
inside = anchored[anchored.obs['omx_spot'].notna()]
by_spot = inside.to_df().groupby(inside.obs['omx_spot'].astype(str).to_numpy())
bin_mean, bin_min = by_spot.mean(), by_spot.min()
spots = omx.get.predictions(sdata, 'omx_pred', section='C4')  # layers['observed']: measured, same scale
measured = spots.to_df(layer='observed').set_axis(spots.obs['spot_id'].astype(str).to_numpy())
measured = measured.loc[bin_mean.index, bin_mean.columns].to_numpy()
diff = np.abs(bin_mean.to_numpy() - measured)
exact, clipped = diff < 1e-4, bin_min.to_numpy() == 0
print(f'{exact.mean():.0%} of {exact.size:,} spot-gene pairs: the bins average to the measurement (within 1e-4)')
print(f'the others: {clipped[~exact].mean():.0%} have a bin clipped at zero, {(measured[~exact] == 0).mean():.0%} '
      f'were measured at zero; mean of the bins {diff[~exact].mean():.3f} above the measurement')""",
    ),
    (
        "md",
        """The exceptions are, almost all, genes that a spot measured at zero (ST counts are sparse). Predictions
are clipped at zero, as the log of expression is never negative, so the bins of such a spot cannot average to
zero unless all of them are zero, and their mean lies a little above the measurement.

Zoom on a square millimetre of C4 (`crop=`, in microns), with one colour scale per gene so that the three
maps compare: the spot-level prediction of the grid, the image-only bins, and the bins anchored to the measured
spots.""",
    ),
    (
        "code",
        """crop = (1800, 2800, 1300, 2300)  # x0, x1, y0, y1 in microns from the image's top-left corner
maps = {
    'omx_pred_hex': '55 um grid, spot model',
    'omx_superres': '25 um bins, image only',
    'omx_superres_anchored': '25 um bins, anchored',
}
fig, axes = plt.subplots(2, 3, figsize=(13, 8), layout='constrained')
for row, gene in zip(axes, ['FASN', 'IGKC'], strict=True):
    lo, hi = np.percentile(sdata.tables['omx_superres'][:, gene].X, [1, 99])
    for ax, (key, title) in zip(row, maps.items(), strict=True):
        omx.pl.prediction_map(sdata, gene, table_key=key, crop=crop, vmin=lo, vmax=hi, ax=[ax], show=False)
        ax.set_title(f'{gene}: {title}', fontsize=10)""",
    ),
    (
        "md",
        """## Spatial domains: Leiden clusters of the predicted bins

`omx.get.predictions` returns the bins as an AnnData (bins x genes, predictions in `X`, bin centres in microns
in `obsm['spatial']`), ordinary scanpy input. The ridge predicts all 784 genes through a few shared components
(`fine_model.n_components_`, chosen by cross-validation), so the predicted expression has no more dimensions
than that (up to the clipping at zero): PCA keeps them all with as many components.""",
    ),
    (
        "code",
        """bins = omx.get.predictions(sdata, 'omx_superres')
sc.pp.pca(bins, n_comps=fine_model.n_components_)
print('share of the variance per component:', bins.uns['pca']['variance_ratio'].round(3))
# exact neighbours: scanpy's approximate search (pynndescent) is meant for far larger data
sc.pp.neighbors(bins, n_neighbors=15, transformer='sklearn')
sc.tl.leiden(bins, resolution=0.2, flavor='igraph', n_iterations=2, directed=False, random_state=0)
bins.obs['leiden'].value_counts().sort_index()""",
    ),
    (
        "md",
        """Put the clusters back into the SpatialData table of the bins, and draw the bins with their true shape
over the H&E:""",
    ),
    (
        "code",
        """sdata.tables['omx_superres'].obs['leiden'] = bins.obs['leiden']  # aligned on the bins' names
# method='matplotlib' draws every bin (above 10,000 shapes the default, datashader, wants a 'global' coordinate system)
(
    sdata.pl.render_images('C4_he')
    .pl.render_shapes('C4_he_square_25um', color='leiden', table_name='omx_superres', method='matplotlib')
    .pl.show(coordinate_systems='C4', figsize=(6, 5), title='Leiden clusters of the predicted bins')
)""",
    ),
    (
        "md",
        """The genes that set each cluster apart (t-test of each cluster against the rest), among those the model
predicted well on C4's held-out spots in the first section (Pearson r of at least 0.4; a gene the image does
not predict can still rank high, through the components it shares with the others), beside the mean predicted
expression of four markers:""",
    ),
    (
        "code",
        """sc.tl.rank_genes_groups(bins, 'leiden')
trusted = scores.index[scores['pearson'] >= 0.4]
markers = sc.get.rank_genes_groups_df(bins, group=None).query('names in @trusted')
summary = bins.to_df()[['FASN', 'SCD', 'FN1', 'IGKC']].groupby(bins.obs['leiden'], observed=True).mean().round(2)
summary['bins'] = bins.obs['leiden'].value_counts()
top = markers.groupby('group', observed=True).head(4)
summary['top genes'] = top.groupby('group', observed=True)['names'].agg(', '.join)
summary""",
    ),
    (
        "md",
        """The first component holds most of the predicted variation, so the clusters are mostly steps along one
axis: from stroma rich in plasma cells (immunoglobulins such as IGKC high, FASN and SCD low; matrix genes such
as BGN lead) to tumour (FASN and SCD high). They are coarse spatial domains drawn from the image, not cell
types: a bin of 25 um holds a few cells.

Treat bins at the tissue's edge with care: their context windows (up to 75 um across) reach over the glass,
which no training spot showed. The smallest cluster lies almost entirely along part of the edge; whether it is a
rim of immune cells or an effect of the glass, the image alone cannot tell.

## What you did, and what next

You fitted a model on two measured sections, found the tissue of an H&E-only slide, laid a Visium-like grid and a
grid of 25 um bins over it, predicted expression for both from the image alone, clustered the bins with scanpy
and drew everything over the H&E. For a measured slide, anchored super-resolution kept the measured spot values
and added the image's detail.

On your own slides:

- **Microns per pixel.** omx cuts patches at a fixed physical size, so it needs the image's resolution. It reads
  it from a coordinate system in microns (omx's readers make one) or from the spots of a measured section; for
  an H&E-only image read any other way, pass the scanner's value as `mpp=` (e.g. 0.25 at 40x) to
  `detect_tissue`, `tile_grid`, `predict_expression` and `super_resolve`.
- **Better features.** The image representation limits accuracy. Pathology foundation encoders plug into the
  same calls: `omx.models.Ridge(encoder=omx.encoders.get_encoder('uni', weights='path/to/pytorch_model.bin'))`
  as `model=` of `fit_predict` or `super_resolve`, with weights downloaded once (see the quickstart). They want
  a GPU: on two CPU cores a ViT-L encodes under one patch per second.
- **Large slides.** Grids of hundreds of thousands of units stream: patches are cut tile by tile and features
  written to disk chunk by chunk, never the whole slide in memory; keep `omx.settings.feature_store` on a disk
  with room to reuse them.

Read the maps with the model's accuracy in mind. A ridge on handcrafted colour, stain and texture features
reaches a mean Pearson r of about 0.16 per gene over the 785-gene panel on held-out her2st sections at spot
level. C4 scores higher here (above) because it is a serial section of the same tumour as the training
sections. The bins have no measured truth in this sample: their detail is the image's, and a gene's map is
worth what that gene's score on held-out measured spots says.""",
    ),
]

PLATFORMS = [
    (
        "md",
        """# Your own Visium or Xenium data

This tutorial starts where your data start: the output folder of 10x Genomics' pipeline. It reads Visium folders
with [spatialdata-io](https://spatialdata.scverse.org/projects/io), fits a model on the measured sections,
predicts expression on a section that has only an H&E image, draws the result with
[spatialdata-plot](https://spatialdata.scverse.org/projects/plot) and tells how to open it in
napari-spatialdata. Short sections then do the same with Visium HD and Xenium.

It runs offline, in under two minutes on two CPU cores, on folders that omx writes from its packaged her2st
sample (HER2-positive breast tumour; Andersson et al., *Nat Commun* 12, 6012 (2021), CC BY 4.0) in 10x's
layout. Their counts and H&E are real, at about 2 um per pixel; the spots are Spatial Transcriptomics spots (100
um) declared as Visium's 55 um spots, and what Visium HD and Xenium would have measured at a finer scale is
simulated from the spots' counts (each writer's docstring says how). Everything is written into a temporary
folder. With your own data, replace the paths.""",
    ),
    (
        "code",
        """import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import spatialdata as sd
import spatialdata_io
import spatialdata_plot  # noqa: F401  (adds sdata.pl)

import omx

# spatialdata-io's readers warn that they make the table's region column categorical: nothing to act on
warnings.filterwarnings('ignore', message='.*region.*categorical', category=UserWarning)
root = Path(tempfile.mkdtemp())


def tree(folder):
    \"\"\"Print the files under ``folder`` with their sizes.\"\"\"
    for p in sorted(folder.rglob('*')):
        if p.is_file():
            print(f'{p.relative_to(folder.parent)!s:60} {p.stat().st_size / 1e6:6.2f} MB')""",
    ),
    (
        "md",
        """## Visium: from Space Ranger folders to one SpatialData

`write_sample_visium` writes one section as Space Ranger 2 does: the filtered count matrix, the full-resolution
H&E that was given to Space Ranger, and the `spatial/` folder with the spot positions, the scale factors and the
downscaled images. Write three: C2 and C3 to train on, C4 to check the model on a measured section it has not
seen.""",
    ),
    (
        "code",
        """with omx.settings.override(verbosity='warning'):  # quiet: the writers' own reading of the sample
    folders = {s: omx.datasets.write_sample_visium(root / 'visium', s) for s in ['C2', 'C3', 'C4']}
tree(folders['C2'])""",
    ),
    (
        "md",
        """`spatialdata_io.visium` reads one folder into a SpatialData: the images (`C2_full_image` when you name the
full-resolution file, `C2_hires_image`, `C2_lowres_image`), the spots as circles named after the sample (`C2`),
and a table `table` whose `obs['region']` says which circles each row annotates. `spatialdata.concatenate` joins
the samples. 10x barcodes repeat from one slide to the next, so prefix each table's barcodes with its sample
first: the joined table then has unique row names.""",
    ),
    (
        "code",
        """samples = []
for section, folder in folders.items():
    sample = spatialdata_io.visium(folder, fullres_image_file=f'{section}_full_image.tif')
    table = sample.tables['table']
    table.obs_names = section + '_' + table.obs_names
    samples.append(sample)
sdata = sd.concatenate(samples, concatenate_tables=True)
sdata""",
    ),
    (
        "md",
        """## Fit a model

omx needs no more than that. For each section it takes the H&E at full resolution rather than the hires or
lowres PNG, finds the microns per pixel from Visium's spots (55 um across, and spatialdata-io's circles know their
diameter in pixels), and reads the sections from the table's `region` column: `C2`, `C3` and `C4`, the names of
the circles. The log says what it chose (the INFO lines below; `omx.settings.verbosity = 'warning'` silences
them).

Fit a ridge on C2 and C3 and predict C4, whose measured counts score the prediction gene by gene. Then save the
model: model weights are never stored inside the SpatialData.""",
    ),
    (
        "code",
        """model = omx.tl.fit_predict(sdata, train=['C2', 'C3'], predict=['C4'], model='ridge', show_progress_bar=False)
model_path = root / 'ridge_visium'
model.save(model_path)
genes = ['FASN', 'FN1', 'IGKC']
omx.get.scores(sdata, 'omx_pred').set_index('gene').loc[genes, ['pearson', 'spearman']].round(2)""",
    ),
    (
        "md",
        """FASN (fatty acid synthase, high in HER2-positive tumour cells), FN1 (fibronectin, in the stroma) and IGKC
(immunoglobulin kappa, from plasma cells) mark the tumour's main compartments, and the model predicts them
better than the average gene. `omx.tl.cross_validate(sdata)` holds out each section in turn, for a score that
does not rest on one section.

## A section with only an H&E image

Most slides have an H&E image and nothing else: a file from the slide scanner. Take C4's full-resolution TIFF
alone, as if it were such a slide, and read it with `spatialdata_io.image` into a SpatialData of one image.

An image alone does not say how large its pixels are, and omx cuts patches at a fixed physical size, so it needs
them. Give them in one of two ways:

- pass `mpp=` (microns per pixel of the full resolution) to `detect_tissue`, `tile_grid` and
  `predict_expression`, as below. The scanner records it: about 0.25 at 40x and 0.5 at 20x; openslide reads it
  as `openslide.mpp-x`. This sample was scanned at 2 um per pixel;
- or put the image in a coordinate system in microns, i.e. a `Scale` of `mpp` from its pixels, and mark that
  coordinate system as microns: `sdata.attrs['omx'] = {'units': {'<name>': 'um'}}`, or name it `'um'`. Then no
  call needs `mpp=`.""",
    ),
    (
        "code",
        """image = spatialdata_io.image(
    folders['C4'] / 'C4_full_image.tif', data_axes=('y', 'x', 'c'), coordinate_system='C4', use_tiff_memmap=False,
    scale_factors=[2, 2, 2],
)
he = sd.SpatialData(images={'C4_he': image})
mpp = 2.0  # microns per pixel, from the scanner
he""",
    ),
    (
        "md",
        """Find the tissue (`detect_tissue` adds its outline as polygons, `C4_he_tissue`), lay a Visium-like grid
over it (`tile_grid`: circles of 55 um on a hexagonal lattice 100 um apart, those whose centre lies in the tissue)
and predict each circle with the saved model. As no table annotates the circles, `predict_expression` writes a
new table, `omx_pred`, one row per circle, predictions on the scale log1p(counts / total x 1e4).""",
    ),
    (
        "code",
        """model = omx.models.Model.load(model_path)
omx.pp.detect_tissue(he, mpp=mpp)
omx.pp.tile_grid(he, kind='hex', size_um=55, within='C4_he_tissue', mpp=mpp)
omx.tl.predict_expression(he, model, shapes_key='C4_he_hex_55um', mpp=mpp, show_progress_bar=False)
he.tables['omx_pred']""",
    ),
    (
        "md",
        """## View the result with spatialdata-plot

spatialdata-plot draws the image, the tissue outline and the circles coloured by a gene of the table that
annotates them. Name the coordinate system to draw (here `C4`, in the image's pixels). Above 10,000 shapes its
default renderer wants a coordinate system called `global`; with another one, pass `method='matplotlib'` to
`render_shapes`.""",
    ),
    (
        "code",
        """(
    he.pl.render_images('C4_he')
    .pl.render_shapes('C4_he_tissue', fill_alpha=0, outline_alpha=1, outline_color='red', outline_width=1.5)
    .pl.render_shapes('C4_he_hex_55um', color='FASN', table_name='omx_pred')
    .pl.show(coordinate_systems='C4', figsize=(6, 5), title='C4 from its H&E alone: FASN, predicted')
)""",
    ),
    (
        "md",
        """`omx.pl.prediction_map` draws several genes side by side, each with its own colour scale (1st to 99th
percentile) and a scale bar:""",
    ),
    ("code", "omx.pl.prediction_map(he, genes, table_key='omx_pred', ncols=3)"),
    (
        "md",
        """C4 was measured after all, so compare with what its spots measured (left) and what the same model
predicted for them (right). The grid's maps above should show the same compartments, in more places:""",
    ),
    ("code", "omx.pl.expression(sdata, genes=['FASN', 'IGKC'], section='C4', ncols=2);"),
    (
        "md",
        """## Open it in napari-spatialdata

To pan and zoom over the whole slide, toggle layers and colour the circles by any gene, open the same object in
[napari-spatialdata](https://spatialdata.scverse.org/projects/napari) (a desktop application; not installed
here, so this cell is not run):

```python
# pip install 'napari-spatialdata[all]'
from napari_spatialdata import Interactive

Interactive(he)
```

In the viewer, pick the coordinate system `C4`, add the image `C4_he` and the shapes `C4_he_hex_55um`, and
choose a gene of the table `omx_pred` to colour them. To keep the result, write it to zarr (`he.write(path)`)
and read it back with `spatialdata.read_zarr` later, in napari or in Python.

## Visium HD

`write_sample_visium_hd` writes a Space Ranger 3 folder of an 800 um square of C4, with 2, 8 and 16 um bins.
`spatialdata_io.visium_hd` reads one table per bin size (`square_002um`, `square_008um`, `square_016um`) and the
bins as squares (`C4_square_008um`, ...).""",
    ),
    (
        "code",
        """with omx.settings.override(verbosity='warning'):
    hd_folder = omx.datasets.write_sample_visium_hd(root / 'visium_hd', 'C4', bin_sizes=(2, 8, 16), crop_um=800)
hd = spatialdata_io.visium_hd(hd_folder, load_segmentations_only=False)
hd""",
    ),
    (
        "md",
        """omx uses the 8 um bins unless told otherwise (`table_key='square_016um'` picks the 16 um ones) and finds
the microns per pixel from their side. The bins' predictions go into their table, `layers['omx_pred']`, beside the
measured counts; the model was fitted on Visium spots, and cuts the same patches (a spot with its context)
around each bin's centre.

In this sample, bins exist only where the her2st spots were (their counts are those spots' counts, split among
the bins), so the maps show discs of bins. Neighbouring bins share most of their patch, so their predictions
vary smoothly: a model fitted on 55 um spots does not see 8 um detail. `omx.tl.super_resolve` fits a model for
units smaller than the training spots (see the tutorial on H&E-only slides).""",
    ),
    (
        "code",
        """omx.tl.predict_expression(hd, model, show_progress_bar=False)
bins16 = omx.tl.predict_expression(hd, model, table_key='square_016um', inplace=False, show_progress_bar=False)
hd.tables['square_008um'], bins16""",
    ),
    ("code", "omx.pl.prediction_map(hd, genes, table_key='square_008um', layer='omx_pred', ncols=3)"),
    (
        "md",
        """## Xenium

`spatialdata_io.xenium(path)` reads a Xenium output folder; the H&E that 10x scans after the run comes with
its alignment file, through `spatialdata_io.xenium_aligned_image(image_path, alignment_file)`, added as an image
registered to the morphology pixels. `omx.datasets.sample_xenium` builds such an object from the sample: the same
element names (`he_image`, `morphology_focus`, `cell_boundaries`, `nucleus_boundaries`, labels `cell_labels`) and
a table `table` that annotates the labels, with simulated cells inside C4's spots.""",
    ),
    (
        "code",
        "with omx.settings.override(verbosity='warning'):\n    xenium = omx.datasets.sample_xenium('C4')\nxenium",
    ),
    (
        "md",
        """A Xenium panel measures a few hundred genes. Fit a model on those genes of the Visium sections, and predict
the cells: omx takes the RGB `he_image` over the fluorescence `morphology_focus`, reaches each row's cell polygon
through its `cell_id`, and reads the microns per pixel from the cell boundaries (spatialdata-io keeps them in
microns).""",
    ),
    (
        "code",
        """panel = list(xenium.tables['table'].var_names)
panel_model = omx.tl.fit_predict(
    sdata, train=['C2', 'C3'], predict=['C4'], genes=panel, key_added='omx_panel', show_progress_bar=False
)
omx.tl.predict_expression(xenium, panel_model, show_progress_bar=False)
cells = omx.get.predictions(xenium, 'omx_pred')  # predictions in X, the measured cells in layers['observed']
cell_scores = omx.metrics.gene_scores(cells.layers['observed'], cells.X, cells.var_names)
print(f"{cells.n_obs} cells: mean Pearson r {cell_scores['pearson'].mean():.3f} over {cells.n_vars} genes")
cell_scores.loc[genes, ['pearson', 'spearman']].round(2)""",
    ),
    (
        "md",
        """A cell's measured counts are about 130 UMIs here, a random share of its spot's: cells of one spot differ by
sampling noise alone, which no image predicts, so read these scores as a check that the cells were matched to
their place in the H&E, not as single-cell accuracy.

`omx.pp.segment_nuclei` finds nuclei in the H&E, not in the fluorescence image, and counts those whose
centre lies in each cell (`obs['omx_n_nuclei']`). This sample's H&E has 2 um pixels, where a nucleus is a few
pixels across: most of the simulated 12 um cells get none. Xenium's post-run H&E is scanned at about 0.25 um per
pixel.""",
    ),
    (
        "code",
        """omx.pp.segment_nuclei(xenium, show_progress_bar=False)
xenium.tables['table'].obs['omx_n_nuclei'].value_counts()""",
    ),
    (
        "md",
        """## Your own data

Replace the written folders with yours; nothing else changes:

```python
sdata = spatialdata_io.visium('path/to/outs', fullres_image_file='path/to/image.tif')
sdata = spatialdata_io.visium_hd('path/to/outs')
sdata = spatialdata_io.xenium('path/to/output')
```

`omx.datasets.visium_breast_ffpe()` downloads a real Visium sample from 10x Genomics (human breast cancer,
FFPE) with pinned checksums and reads it with spatialdata-io, full-resolution image included (not run here: it
needs the network; `fullres_image=False` leaves out the largest file). `omx.datasets.registry()` lists every
file omx can download, with its URL, checksum, licence and citation, and `omx.io.read_hest` reads samples of
HEST-1k. The [user guide](/guide.md#visium-visium-hd-xenium-and-hest) says what omx reads from each
platform.""",
    ),
]


def build(name: str, cells: list[tuple[str, str]]) -> Path:
    """Write the notebook ``tutorials/{name}.ipynb`` from its cells, executed, and return its path."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for cell in nb.cells:  # third-party warnings (tqdm without ipywidgets, docrep) say nothing about omx
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and "Warning" in o.text)]
    path = ROOT / "tutorials" / f"{name}.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "her2st_models": HER2ST,
    "scanpy_squidpy": SCVERSE,
    "cell_types": DECONV,
    "he_only": HE_ONLY,
    "platforms": PLATFORMS,
}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or NOTEBOOKS:
        print(build(name, NOTEBOOKS[name]))
