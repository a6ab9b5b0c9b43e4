"""Training data: user data sets through `datasets`, the built-in shapes, and image preprocessing."""

from ..images import BACKGROUND, to_rgb
from .datasets import DataConfig, ImageCaptionDataset, dataset_from_config, load_image_captions
from .shapes import ShapesDataset, all_combinations, caption_for, render, sample_attributes
from .transforms import ImageTransform

__all__ = [
    "BACKGROUND",
    "DataConfig",
    "ImageCaptionDataset",
    "ImageTransform",
    "ShapesDataset",
    "all_combinations",
    "caption_for",
    "dataset_from_config",
    "load_image_captions",
    "render",
    "sample_attributes",
    "to_rgb",
]
