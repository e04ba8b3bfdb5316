"""The training data sets: multi-crop items keyed by (epoch, index), their collation, the embedded sample pictures,
and the pre-training data set of a run (an ImageFolder or embedded data).

Randomness: every image draws from its own generator seeded by (seed, epoch, index), so a batch does not depend
on the number of data-loader workers or of DDP ranks, and a resumed run redraws the same views. The epoch comes
with each key (EpochIndex, yielded by udi.data.samplers.ShardedBatchSampler), so it reaches the workers however
the loader is built, persistent workers included.
"""
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .augmentation import (Crop, MultiCropAugmentation, RandomDraws, image_generator, place_overlapping, resized_crop,
                           to_float_image)
from .folders import image_folder
from .labelled import LABELLED_DATA, labelled_images

EMBEDDED_IMAGES = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                   "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
                   "rocket", "text", "cell")


class EpochIndex(NamedTuple):
    """The key of a MultiCropDataset item: image `index` as drawn in epoch `epoch`."""
    epoch: int
    index: int


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a dataset of images (any (image, label) or image items) into (views, boxes) multi-crop items.

    dataset[EpochIndex(epoch, index)] -> (2 + L views, boxes [2 + L, 4]) of image `index` in epoch `epoch`; the
    epoch is part of the key, not state of the data set, so that data-loader workers (persistent ones too) see
    it. TypeError for another key."""

    def __init__(self, images, augmentation: MultiCropAugmentation, seed: int = 0):
        self.images, self.augmentation, self.seed = images, augmentation, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key: EpochIndex):
        if not isinstance(key, EpochIndex):
            raise TypeError(f"MultiCropDataset items are keyed by EpochIndex(epoch, index) (ShardedBatchSampler "
                            f"yields them), got {type(key).__name__}")
        item = self.images[key.index]
        picture = item[0] if isinstance(item, tuple) else item
        return self.augmentation(to_float_image(picture), image_generator(self.seed, 1, key.epoch, key.index))


def collate_multicrop(batch):
    """[(views, boxes)] -> (list of 2 + L tensors [B, 3, s, s], boxes [B, 2 + L, 4] float32)."""
    views = [torch.stack(crop) for crop in zip(*(item[0] for item in batch))]
    return views, torch.stack([item[1] for item in batch])


class EmbeddedImages(torch.utils.data.Dataset):
    """Random square regions (30-100 % of the short side) of scikit-image's sample images, resized to `size`.

    Item `i` is always the same region of image `i % n`, so the dataset is a fixed set of `length` pictures.
    """

    def __init__(self, length: int = 512, size: int = 128, names: Sequence[str] = EMBEDDED_IMAGES, seed: int = 0):
        import skimage.data
        self.sources = [to_float_image(np.ascontiguousarray(getattr(skimage.data, n)())) for n in names]
        self.length, self.size, self.seed = length, size, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        source = self.sources[index % len(self.sources)]
        rng = RandomDraws(image_generator(self.seed, 0, index))
        side = round(min(source.shape[-2:]) * rng.uniform(0.3, 1.0))
        crop = place_overlapping(rng, source.shape[-2:], (side, side), Crop(0, 0, *source.shape[-2:]))
        return resized_crop(source, crop, self.size)


def pretraining_dataset(path, augmentation: MultiCropAugmentation, seed: int, embedded: str = "digits",
                        embedded_length: int = 1280, embedded_size: int = 128):
    """ImageFolder at `path`, or with path None embedded data: "digits" or "scenes", the first `embedded_length`
    images of the labelled data's train split without labels (evaluation uses the held-out split), or "images",
    regions of scikit-image's sample images."""
    if path is not None:
        images = image_folder(path, "--data_path")
    elif embedded in LABELLED_DATA:
        images = labelled_images(embedded, embedded_length, augmentation.global_size, "train")[0]
    else:
        images = EmbeddedImages(length=embedded_length, size=embedded_size, seed=seed)
    return MultiCropDataset(images, augmentation, seed=seed)

