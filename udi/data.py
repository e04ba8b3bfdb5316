"""Multi-crop views with their crop boxes (UDI_SPEC §1), datasets and the embedded demo data.

Crop rules, as we read the reference: every crop's size is drawn like RandomResizedCrop (area as a fraction of
the image, log-uniform aspect ratio). Global crop 0 may sit anywhere; global crop 1 and every local crop are
placed uniformly among the positions where they overlap their anchor region by at least one pixel: crop 1's
anchor is global crop 0, the locals' anchor is the bounding box of the two global crops.

A crop of `h x w` pixels at `(top, left)` in an `Hi x Wi` image has the signed "ij" box
`(top/(Hi-1), left/(Wi-1), (top+h-1)/(Hi-1), (left+w-1)/(Wi-1))`; a horizontal flip swaps j0 and j1.

Photometric augmentations are DINO's. Its Gaussian-blur sigmas (0.1-2 px) are pixels of a 224-px global crop; for
other global crop sizes they are scaled by global_size / 224 (both for global and local views, which DINO blurs with
the same sigmas), so a 32-px demo crop is blurred as much, relative to its content, as a 224-px one.

Randomness: every image draws from its own generator seeded by (seed, epoch, index), so a batch does not depend
on the number of data-loader workers or of DDP ranks, and a resumed run redraws the same views.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_IMAGES = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                   "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
                   "rocket", "text", "cell")


def normalize(images: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> normalised with the ImageNet statistics (as every view)."""
    return TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD)


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class RandomDraws:
    """Uniform numbers from a torch.Generator, drawn DRAWS_PER_CALL at a time (float64): a view needs about 16, and
    one generator call per number was a tenth of the augmentation's time."""
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
    its factor still drawn, a third of the augmentation's time saved."""
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
    of shifted slices: equal to it up to float rounding (tests), 2-3x faster on small views, where its 2-D
    convolution's per-call overhead dominated the augmentation. ValueError for an even kernel or sigma <= 0."""
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
    antialiasing: what torchvision's resized_crop computes, bit for bit (tests), without its per-call overhead."""
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


def image_generator(*words: int) -> torch.Generator:
    """A generator seeded by non-negative integer words, e.g. (seed, stream, epoch, index)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def to_float_image(picture) -> Tensor:
    """PIL image / HxW / HxWxC array -> [3, H, W] float32 in [0, 1]."""
    image = TF.to_dtype(TF.to_image(picture), torch.float32, scale=True)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].contiguous()


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a dataset of images (any (image, label) or image items) into (views, boxes) multi-crop items."""

    def __init__(self, images, augmentation: MultiCropAugmentation, seed: int = 0):
        self.images, self.augmentation, self.seed, self.epoch = images, augmentation, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        item = self.images[index]
        picture = item[0] if isinstance(item, tuple) else item
        return self.augmentation(to_float_image(picture), image_generator(self.seed, 1, self.epoch, index))


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


def eval_transform(size: int):
    """Deterministic evaluation view: resize the short side, centre crop, normalise."""
    def transform(picture):
        image = TF.resize(to_float_image(picture), [size], antialias=True)
        return normalize(TF.center_crop(image, [size, size]))
    return transform


SCENES_SEED = 0  # the generated data are the same for every training seed
# The embedded labelled data (nothing downloaded): name -> (images the evaluation's probes are fit on, held-out
# images they are scored on), the first of the train and of the val split
LABELLED_DATA = {"digits": (1280, 517), "scenes": (2048, 512)}


def check_labelled_data(data: str):
    if data not in LABELLED_DATA:
        raise ValueError(f"data must be one of {tuple(LABELLED_DATA)}, got {data!r}")


def labelled_images(data: str, count: int, size: int, split: str):
    """The first `count` images of a split ("train" or "val") of the embedded labelled data `data`: "digits"
    (udi.digits) or "scenes" (udi.scenes) -> (images [count, 3, size, size] float32 in [0, 1], labels [count]
    int64, pixel labels [count, size, size] int64: 0 background, 1 + class). Cached; ValueError for an unknown name."""
    check_labelled_data(data)
    if data == "digits":
        from .digits import generate_digits
        return generate_digits(count, size, split)
    from .scenes import generate_scenes
    return generate_scenes(count, size, split, SCENES_SEED)


def class_names(data: str) -> tuple:
    """The class names of the embedded labelled data `data`."""
    check_labelled_data(data)
    from .digits import CLASS_NAMES
    from .scenes import SHAPES
    return {"digits": CLASS_NAMES, "scenes": SHAPES}[data]


class LabelledImages(torch.utils.data.Dataset):
    """Embedded labelled data (labelled_images) of one split, `count` images at `size` pixels: items are
    (normalised image [3, size, size], image label); `pixel_labels` [count, size, size] holds the per-pixel classes."""

    def __init__(self, data: str, split: str, count: int, size: int = 32):
        images, self.labels, self.pixel_labels = labelled_images(data, count, size, split)
        self.images = normalize(images)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def pretraining_dataset(path, augmentation: MultiCropAugmentation, seed: int, embedded: str = "digits",
                        embedded_length: int = 1280, embedded_size: int = 128):
    """ImageFolder at `path`, or with path None embedded data: "digits" or "scenes", the first `embedded_length`
    images of the labelled data's train split without labels (evaluation uses the held-out split), or "images",
    regions of scikit-image's sample images."""
    if path is not None:
        from .folders import image_folder
        images = image_folder(path, "--data_path")
    elif embedded in LABELLED_DATA:
        images = labelled_images(embedded, embedded_length, augmentation.global_size, "train")[0]
    else:
        images = EmbeddedImages(length=embedded_length, size=embedded_size, seed=seed)
    return MultiCropDataset(images, augmentation, seed=seed)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Per epoch, a seeded permutation cut into global batches of `batch_size * world_size`; rank r takes the
    r-th contiguous slice of each, so ranks gathered in rank order see exactly the single-process batch.
    Incomplete global batches are dropped."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.length, self.batch_size, self.rank, self.world_size, self.seed = length, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        for start in range(0, len(self) * global_batch, global_batch):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()
