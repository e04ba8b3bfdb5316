"""Embedded handwritten digits: scikit-learn's copy of the UCI optical digits (1797 grey 8 x 8 images of 0-9, part
of the package, nothing downloaded), upscaled to `size` pixels, with a class per image and a class per pixel.

The demo pre-trains on the train split (labels unused) and evaluates on the held-out split. At 32 px and patch 4
a patch is one pixel of the original 8 x 8 digit. A randomly initialised ViT's class tokens tell the digits apart
only partly (k-NN about 46 %), while their pixels tell them apart almost perfectly: room for self-supervision to
show (benchmarks/NOTES.md, "The demo learns").

Splits: a fixed permutation (seed 0) of the 1797 digits, the first TRAIN_DIGITS for "train", the rest (517) for
"val"; they never share an image.
"""
import functools

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

CLASS_NAMES = tuple(str(d) for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)
TRAIN_DIGITS = 1280
INK = 0.5  # a pixel belongs to its digit where the upscaled intensity reaches this


@functools.lru_cache(maxsize=1)
def _all_digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = torch.from_numpy(digits.images[order]).float()[:, None] / 16.0
    return images, torch.from_numpy(digits.target[order]).long()


def split_size(split: str) -> int:
    """The number of digits in a split ("train" or "val")."""
    return TRAIN_DIGITS if split == "train" else len(_all_digits()[1]) - TRAIN_DIGITS


@functools.lru_cache(maxsize=8)
def generate_digits(count: int, size: int = 32, split: str = "train"):
    """The first `count` digits of a split at `size` x `size` pixels -> (images [count, 3, size, size] float32 in
    [0, 1] (grey), labels [count] int64, pixel labels [count, size, size] int64: 0 background, 1 + digit on the
    ink). Raises ValueError for an unknown split or more digits than the split holds. Cached: the same
    arguments return the same tensors."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be one of ('train', 'val'), got {split!r}")
    if not 0 <= count <= split_size(split):
        raise ValueError(f"the {split} split holds {split_size(split)} digits, {count} were asked for")
    images, labels = _all_digits()
    start = 0 if split == "train" else TRAIN_DIGITS
    images, labels = images[start:start + count], labels[start:start + count]
    images = TF.resize(images, [size, size], antialias=True).clamp(0, 1)
    pixels = torch.where(images[:, 0] >= INK, 1 + labels[:, None, None], 0)
    return images.expand(-1, 3, -1, -1).contiguous(), labels, pixels
