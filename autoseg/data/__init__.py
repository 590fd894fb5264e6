"""Image/mask pairs on disk -> a scanned `Dataset`: sizes, channels, normalisation and the class map.

images: reading images and masks (pixel limit, EXIF orientation, modes, bands of rows); pairs: pairing each image
with its mask by file name; class_map: `ClassMap`, raw mask values -> class ids / IGNORE; class_files: classes
declared by data.palette, classes.json, labelmap.txt or class_dict.csv; class_inference: the class map the masks'
values call for (binary, contiguous, palette: the rules are there); dataset: `Dataset`, scan, digest, load_pair,
load_mask and the split by image.
"""

from autoseg.data.class_files import CLASS_FILES, CLASSES_FILE
from autoseg.data.class_map import IGNORE, ClassMap, mask_dtype
from autoseg.data.dataset import Dataset, dataset_digest, load_mask, load_pair, scan_dataset, split_by_image
from autoseg.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EXIF_ORIENTATION,
    MAX_PIXELS_ENV,
    ImageRows,
    max_image_pixels,
    read_image,
    read_raw_mask,
)
from autoseg.data.pairs import IMAGE_EXTS, Pair, find_pairs, list_images

__all__ = [
    "CLASSES_FILE",
    "CLASS_FILES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EXIF_ORIENTATION",
    "IGNORE",
    "IMAGE_EXTS",
    "MAX_PIXELS_ENV",
    "ClassMap",
    "Dataset",
    "ImageRows",
    "Pair",
    "dataset_digest",
    "find_pairs",
    "list_images",
    "load_mask",
    "load_pair",
    "mask_dtype",
    "max_image_pixels",
    "read_image",
    "read_raw_mask",
    "scan_dataset",
    "split_by_image",
]
