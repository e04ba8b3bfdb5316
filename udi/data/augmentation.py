"""The views: multi-crop views of an image with their crop boxes (UDI_SPEC §1), and the evaluation view.

Crop rules, as we read the reference: every crop's size is drawn like RandomResizedCrop (area as a fraction of
the image, log-uniform aspect ratio). Global crop 0 may sit anywhere; global crop 1 and every local crop are
placed uniformly among the positions where they overlap their anchor region by at least one pixel: crop 1's
anchor is global crop 0, the locals' anchor is the bounding box of the two global crops.

A crop of `h x w` pixels at `(top, left)` in an `Hi x Wi` image has the signed "ij" box
`(top/(Hi-1), left/(Wi-1), (top+h-1)/(Hi-1), (left+w-1)/(Wi-1))`; a horizontal flip swaps j0 and j1.

Photometric augmentations are DINO's. Its Gaussian-blur sigmas (0.1-2 px) are pixels of a 224-px global crop; for
other global crop sizes they are scaled by global_size / 224 (both for global and local views, which DINO blurs with
the same sigmas), so a 32-px demo crop is blurred as much, relative to its content, as a 224-px one.

Randomness: a view draws from the generator it is given (image_generator of (seed, stream, epoch, index) in
udi.data.datasets), nothing global.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def normalize(images: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> normalised with the ImageNet statistics (as every view)."""
    return TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD)


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class RandomDraws:
    """Uniform numbers from a torch.Generator, drawn DRAWS_PER_CALL at a time (float64): a view needs about 16, and a
    generator call costs far more than one number."""
    DRAWS_PER_CALL = 64

    def __init__(self, gen: torch.Generator):
        self.gen, self.buffer = gen, []

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if not self.buffer:
            self.buffer = torch.rand(self.DRAWS_PER_CALL, dtype=torch.float64, generator=self.gen).tolist()[::-1]
        return low + (high - low) * self.buffer.pop()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]; ValueError if high < low."""
        if high < low:
            raise ValueError(f"randint needs low <= high, got low={low}, high={high}")
        return min(low + int(self.uniform() * (high - low + 1)), high)

    def permutation(self, n: int) -> list:
        keys = [self.uniform() for _ in range(n)]
        return sorted(range(n), key=keys.__getitem__)


def image_generator(*words: int) -> torch.Generator:
    """A generator seeded by non-negative integer words, e.g. (seed, stream, epoch, index)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_crop_size(rng, image_hw, scale, ratio=(3 / 4, 4 / 3), attempts=10):
    """(h, w) like RandomResizedCrop; at least 2 pixels per side so that no box is degenerate."""
    Hi, Wi = image_hw
    for _ in range(attempts):
        area = Hi * Wi * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if 2 <= h <= Hi and 2 <= w <= Wi:
            return h, w
    side = max(2, min(Hi, Wi))
    return min(side, Hi), min(side, Wi)


def place_overlapping(rng, image_hw, size, anchor: Crop) -> Crop:
    """A crop of `size` inside the image, overlapping `anchor` by at least one pixel on each axis."""
    corner = []
    for extent, length, start, anchor_len in zip(image_hw, size, anchor[:2], anchor[2:]):
        low = max(0, start - length + 1)
        high = min(extent - length, start + anchor_len - 1)
        corner.append(rng.randint(low, high))
    return Crop(corner[0], corner[1], *size)


def bounding_crop(a: Crop, b: Crop) -> Crop:
    top, left = min(a.top, b.top), min(a.left, b.left)
    bottom, right = max(a.top + a.height, b.top + b.height), max(a.left + a.width, b.left + b.width)
    return Crop(top, left, bottom - top, right - left)


def crop_box(crop: Crop, image_hw, flipped: bool) -> list:
    """The signed, normalised "ij" box (i0, j0, i1, j1) of a crop."""
    Hi, Wi = image_hw
    i0, i1 = crop.top / (Hi - 1), (crop.top + crop.height - 1) / (Hi - 1)
    j0, j1 = crop.left / (Wi - 1), (crop.left + crop.width - 1) / (Wi - 1)
    return [i0, j1, i1, j0] if flipped else [i0, j0, i1, j1]


@dataclass
class PhotometricPolicy:
    """Per-view probabilities of DINO's augmentations (flip and colour jitter apply to every view)."""
    blur: float
    solarize: float = 0.0


GLOBAL_POLICIES = (PhotometricPolicy(blur=1.0), PhotometricPolicy(blur=0.1, solarize=0.2))
LOCAL_POLICY = PhotometricPolicy(blur=0.5)


def is_grey(image: Tensor) -> bool:
    """Whether the three channels of image [3, h, w] are equal."""
    return bool(torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]))


def color_jitter(rng, image, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """DINO's ColorJitter. A hue shift leaves a grey image with values in [0, 1] as it is, bit for bit (saturation
    0; torchvision clamps some channels of values outside); on such views (the digits, the scenes) it is skipped,
    its factor still drawn."""
    def shift_hue(x):
        factor = rng.uniform(-hue, hue)
        unchanged = is_grey(x) and 0 <= float(x.min()) and float(x.max()) <= 1
        return x if unchanged else TF.adjust_hue(x, factor)

    adjustments = [
        lambda x: TF.adjust_brightness(x, rng.uniform(1 - brightness, 1 + brightness)),
        lambda x: TF.adjust_contrast(x, rng.uniform(1 - contrast, 1 + contrast)),
        lambda x: TF.adjust_saturation(x, rng.uniform(1 - saturation, 1 + saturation)),
        shift_hue,
    ]
    for k in rng.permutation(4):
        image = adjustments[k](image)
    return image


DINO_BLUR_SIGMA = (0.1, 2.0)  # pixels of a 224-px global crop
DINO_GLOBAL_SIZE = 224


def gaussian_blur(rng, image, sigma_range=DINO_BLUR_SIGMA):
    sigma = rng.uniform(*sigma_range)
    kernel = min(2 * math.ceil(3 * sigma) + 1, (min(image.shape[-2:]) - 1) | 1)
    return separable_gaussian_blur(image, kernel, sigma)


def separable_gaussian_blur(image: Tensor, kernel: int, sigma: float) -> Tensor:
    """image [C, H, W] float -> torchvision's gaussian_blur with `kernel` x `kernel` taps (odd, at most the shorter
    side when > 1: reflect padding) and standard deviation `sigma` (pixels, > 0), as a row pass and a column pass
    of shifted slices: equal to it up to float rounding (tests), without a 2-D convolution per call. ValueError for
    an even kernel or sigma <= 0."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number of taps, got {kernel}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = kernel // 2
    weights = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(weights)
    weights = [w / total for w in weights]
    padded = F.pad(image[None], (radius,) * 4, mode="reflect")[0]
    height, width = image.shape[-2:]
    rows = padded[..., :width] * weights[0]
    for i in range(1, kernel):
        rows.add_(padded[..., i:i + width], alpha=weights[i])
    out = rows[..., :height, :] * weights[0]
    for i in range(1, kernel):
        out.add_(rows[..., i:i + height, :], alpha=weights[i])
    return out


def resized_crop(image: Tensor, crop: Crop, size: int) -> Tensor:
    """image [C, H, W] float32 / float64 -> the crop (inside the image) resized to size x size, bilinear with
    antialiasing: what torchvision's resized_crop computes, bit for bit (tests), in one interpolate call."""
    region = image[None, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def photometric(rng, image, policy: PhotometricPolicy, blur_sigma=DINO_BLUR_SIGMA):
    """image [3, h, w] float in [0, 1] -> augmented and normalised."""
    if rng.uniform(0, 1) < 0.8:
        image = color_jitter(rng, image)
    if rng.uniform(0, 1) < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.uniform(0, 1) < policy.blur:
        image = gaussian_blur(rng, image, blur_sigma)
    if rng.uniform(0, 1) < policy.solarize:
        image = TF.solarize(image, threshold=0.5)
    return normalize(image.clamp(0, 1))


class MultiCropAugmentation:
    """image [3, Hi, Wi] float in [0, 1] -> (2 + L crops, boxes [2 + L, 4] float32)."""

    def __init__(self, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), local_crops_number=10,
                 global_size=224, local_size=96):
        self.global_scale, self.local_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_size, self.local_size = global_size, local_size
        self.blur_sigma = tuple(s * global_size / DINO_GLOBAL_SIZE for s in DINO_BLUR_SIGMA)

    def draw_crops(self, rng, image_hw) -> list:
        whole = Crop(0, 0, *image_hw)
        first = place_overlapping(rng, image_hw, draw_crop_size(rng, image_hw, self.global_scale), whole)
        second = place_overlapping(rng, image_hw, draw_crop_size(rng, image_hw, self.global_scale), first)
        anchor = bounding_crop(first, second)
        locals_ = [place_overlapping(rng, image_hw, draw_crop_size(rng, image_hw, self.local_scale), anchor)
                   for _ in range(self.local_crops_number)]
        return [first, second, *locals_]

    def __call__(self, image: Tensor, gen: torch.Generator):
        image_hw, rng = tuple(image.shape[-2:]), RandomDraws(gen)
        views, boxes = [], []
        for n, crop in enumerate(self.draw_crops(rng, image_hw)):
            size = self.global_size if n < 2 else self.local_size
            policy = GLOBAL_POLICIES[n] if n < 2 else LOCAL_POLICY
            view = resized_crop(image, crop, size)
            flipped = rng.uniform(0, 1) < 0.5
            if flipped:
                view = TF.horizontal_flip(view)
            views.append(photometric(rng, view, policy, self.blur_sigma))
            boxes.append(crop_box(crop, image_hw, flipped))
        return views, torch.tensor(boxes, dtype=torch.float32)


def to_float_image(picture) -> Tensor:
    """PIL image / HxW / HxWxC array -> [3, H, W] float32 in [0, 1]."""
    image = TF.to_dtype(TF.to_image(picture), torch.float32, scale=True)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].contiguous()


def eval_transform(size: int):
    """Deterministic evaluation view: resize the short side, centre crop, normalise."""
    def transform(picture):
        image = TF.resize(to_float_image(picture), [size], antialias=True)
        return normalize(TF.center_crop(image, [size, size]))
    return transform


