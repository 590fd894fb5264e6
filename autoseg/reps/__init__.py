"""Representative tiles: a few hundred tiles that stand for every training tile.

features per tile -> standardise -> drop near-duplicates -> MiniBatchKMeans -> per cluster, the tile
richest in rare classes among its nearer half -> class-aware swaps, so a rare class keeps at least one
representative.

The default embedder needs no downloaded weights: per image it reduces per-pixel maps (colour,
gradients, local binary comparisons) to sums over a grid of blocks whose edges are exactly the
tile edges, then reads every tile's sums from an integral image of those blocks. The cost is a
few passes over the pixels, whatever the tile count or overlap. The whole result is cached on
disk, keyed by the data and the settings.

build: build_reps, the steps in order; blocks: the block grid and class counts per tile; embedders: the handcrafted
and CNN embedders; networks: their plain-torch nets; clustering: standardise, dedup, PCA, k-means; picking: the pick
per cluster and the class-aware swaps; cache: the on-disk cache and its key (FEATURE_VERSION); repset: RepSet, its
training arrays and manifest; contact_sheet: the contact sheet and per-tile PNGs.
"""

from autoseg.reps.blocks import class_counts
from autoseg.reps.build import CLASS_SHARE, PCA_DIMS, build_reps
from autoseg.reps.cache import FEATURE_VERSION, cache_key
from autoseg.reps.clustering import Z_CLIP, dedup, kmeans, pca, standardise
from autoseg.reps.contact_sheet import (
    SHEET_CELL,
    SHEET_COLUMNS,
    class_palette,
    colourise,
    write_contact_sheet,
    write_tile_pngs,
)
from autoseg.reps.embedders import CNNEmbedder, Embedder, HandcraftedEmbedder, make_embedder
from autoseg.reps.networks import load_resnet18, resnet18
from autoseg.reps.picking import POOL, class_aware_swap, pick_per_cluster, rarity
from autoseg.reps.repset import RepSet, rep_arrays, write_manifest

__all__ = [
    "CLASS_SHARE",
    "FEATURE_VERSION",
    "PCA_DIMS",
    "POOL",
    "SHEET_CELL",
    "SHEET_COLUMNS",
    "Z_CLIP",
    "CNNEmbedder",
    "Embedder",
    "HandcraftedEmbedder",
    "RepSet",
    "build_reps",
    "cache_key",
    "class_aware_swap",
    "class_counts",
    "class_palette",
    "colourise",
    "dedup",
    "kmeans",
    "load_resnet18",
    "make_embedder",
    "pca",
    "pick_per_cluster",
    "rarity",
    "rep_arrays",
    "resnet18",
    "standardise",
    "write_contact_sheet",
    "write_manifest",
    "write_tile_pngs",
]
