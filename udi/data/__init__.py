"""The data, one module per concern; their public names are re-exported here (`from udi.data import ...`).

- augmentation: the views, multi-crop views with their crop boxes (UDI_SPEC §1) and the evaluation view
- datasets:     multi-crop items keyed by EpochIndex(epoch, index), their collation, the pre-training data set
- samplers:     ShardedBatchSampler, which images each process reads in each step (with the epoch)
- labelled:     the embedded labelled data (udi.digits, udi.scenes): splits, class names, LabelledImages
- folders:      ImageFolder reading (an unreadable image stops the run naming it), the sides of an evaluation
"""
from .augmentation import (IMAGENET_MEAN, IMAGENET_STD, Crop, MultiCropAugmentation, RandomDraws, crop_box,
                           eval_transform, image_generator, normalize, to_float_image)
from .datasets import EmbeddedImages, EpochIndex, MultiCropDataset, collate_multicrop, pretraining_dataset
from .labelled import LABELLED_DATA, LabelledImages, check_labelled_data, class_names, labelled_images
from .samplers import ShardedBatchSampler

__all__ = ["Crop", "EmbeddedImages", "EpochIndex", "IMAGENET_MEAN", "IMAGENET_STD", "LABELLED_DATA", "LabelledImages",
           "MultiCropAugmentation", "MultiCropDataset", "RandomDraws", "ShardedBatchSampler", "check_labelled_data",
           "class_names", "collate_multicrop", "crop_box", "eval_transform", "image_generator", "labelled_images",
           "normalize", "pretraining_dataset", "to_float_image"]
