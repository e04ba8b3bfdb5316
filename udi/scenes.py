"""Generated scenes: labelled images with a class per image and a class per pixel, made deterministically from
a seed (nothing downloaded). `--embedded_data scenes` pre-trains on them; benchmarks/objectives.py compares UDI and
DINO on them (image-level and dense features).

A scene of `size x size` grey pixels has a noise-textured background and 1-3 drawn shapes out of the 10 classes of
`SHAPES`: one large main object, whose class is the image's label, and 0-2 smaller distractors of other classes.
The pixel labels are 0 for the background and 1 + class where a shape covers the pixel centre (the main object is
drawn last, on top). Grey levels, sizes, positions, rotations and aspect ratios are random and independent of the
class, so only the silhouette tells the classes apart. Shapes are antialiased (4 x 4 supersampling).

Why grey and noise: self-supervised learning finds whatever stays the same across two views of an image and tells
images apart. Scenes with random colours and smooth or periodic backgrounds (an earlier version) were clustered by
colour and background, not by shape (k-NN at chance after training): here the background's noise differs between
any two crops and the grey levels are blurred by the brightness / contrast augmentation, so the silhouette is the
main content two views share.

Item `i` of split `s` comes from its own generator seeded by (seed, s, i): the train and held-out splits never
share a scene, and a scene does not depend on how many others are made.
"""
import functools
import math

import numpy as np
import torch
from torch import Tensor

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "star", "crescent", "frame", "ell")
NUM_CLASSES = len(SHAPES)
SUPERSAMPLING = 4
SPLITS = {"train": 0, "val": 1}


def _inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v) of the shape's own frame (the shape spans about [-1, 1]^2) lie inside it."""
    r, box = np.hypot(u, v), np.maximum(abs(u), abs(v))
    if name == "disk":
        return r < 0.9
    if name == "square":
        return box < 0.75
    if name == "triangle":
        return (v < 0.75) & (v > 2.0 * abs(u) - 1.0)
    if name == "plus":
        return ((abs(u) < 0.3) & (abs(v) < 0.95)) | ((abs(v) < 0.3) & (abs(u) < 0.95))
    if name == "ring":
        return (r < 0.95) & (r > 0.55)
    if name == "diamond":
        return abs(u) + abs(v) < 1.0
    if name == "star":
        return r < 0.5 + 0.45 * abs(np.cos(2.5 * np.arctan2(u, -v))) ** 3
    if name == "crescent":
        return (r < 0.95) & (np.hypot(u - 0.5, v + 0.1) > 0.7)
    if name == "frame":
        return (box < 0.9) & (box > 0.55)
    if name == "ell":
        return ((u > -0.8) & (u < -0.25) & (abs(v) < 0.9)) | ((u > -0.8) & (u < 0.75) & (v > 0.35) & (v < 0.9))
    raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")


def _noise_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey noise in 2 x 2 pixel cells (at the supersampled resolution): the same statistics in every scene and
    different content in every crop, so the background tells neither scenes nor views apart."""
    cells = rng.uniform(-1, 1, (size // 2, size // 2))
    return np.kron(cells, np.ones((2 * SUPERSAMPLING, 2 * SUPERSAMPLING)))


def _object_level(rng: np.random.Generator, background: float, gap: float = 0.3) -> float:
    """A grey level at least `gap` darker or brighter than the background's."""
    darker = rng.uniform() < 0.5 and background - gap > 0.05 or background + gap > 0.95
    return rng.uniform(0.0, background - gap) if darker else rng.uniform(background + gap, 1.0)


def _place(rng, size, radius, avoid=None):
    """A centre keeping the shape mostly inside the image and, if possible, off the `avoid` (centre, radius)."""
    for _ in range(20):
        centre = rng.uniform(0.8 * radius, size - 0.8 * radius, 2)
        if avoid is None or np.hypot(*(centre - avoid[0])) > avoid[1] + 0.6 * radius:
            break
    return centre


def render_scene(rng: np.random.Generator, size: int = 32):
    """-> (image [3, size, size] float32 in [0, 1], label int, pixel labels [size, size] int64) as numpy arrays."""
    fine = size * SUPERSAMPLING
    coords = (np.arange(fine, dtype=np.float32) + 0.5) / SUPERSAMPLING
    y, x = np.meshgrid(coords, coords, indexing="ij")
    background = rng.uniform(0.35, 0.65)
    image = background + rng.uniform(0.05, 0.15) * _noise_texture(rng, size)
    labels = np.zeros((fine, fine), dtype=np.int64)

    main_class = int(rng.integers(NUM_CLASSES))
    main_radius = size * rng.uniform(0.28, 0.38)
    main_centre = _place(rng, size, main_radius)
    others = rng.permutation([c for c in range(NUM_CLASSES) if c != main_class])[:rng.integers(0, 3)]
    objects = [(int(c), size * rng.uniform(0.11, 0.15)) for c in others]
    for n, (cls, radius) in enumerate(objects + [(main_class, main_radius)]):
        centre = main_centre if n == len(objects) else _place(rng, size, radius, (main_centre, main_radius))
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        dx, dy = (x - centre[0]) / radius, (y - centre[1]) / radius
        u = (dx * math.cos(angle) + dy * math.sin(angle)) * aspect
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / aspect
        inside = _inside(SHAPES[cls], u, v)
        shading = 1 + 0.1 * np.clip(u - v, -1, 1)  # a soft gradient across the shape
        image = np.where(inside, np.clip(_object_level(rng, background) * shading, 0, 1), image)
        labels = np.where(inside, 1 + cls, labels)
    image = np.clip(image, 0, 1).reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean((1, 3))
    centre = SUPERSAMPLING // 2
    grey = np.broadcast_to(image, (3, size, size))
    return grey.astype(np.float32), main_class, labels[centre::SUPERSAMPLING, centre::SUPERSAMPLING]


@functools.lru_cache(maxsize=8)
def generate_scenes(count: int, size: int = 32, split: str = "train", seed: int = 0):
    """`count` scenes of one split -> (images [count, 3, size, size] float32 in [0, 1], labels [count] int64,
    pixel labels [count, size, size] int64). Cached: the same arguments return the same tensors."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    scenes = [render_scene(np.random.default_rng([seed, SPLITS[split], i]), size) for i in range(count)]
    images, labels, pixels = zip(*scenes)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), torch.from_numpy(np.stack(pixels))


def patch_labels(pixel_labels: Tensor, patch_size: int) -> Tensor:
    """[n, H, W] pixel classes -> [n, H // p, W // p]: the most frequent class of each p x p patch (ties: the
    smallest class index)."""
    n, H, W = pixel_labels.shape
    gh, gw = H // patch_size, W // patch_size
    patches = pixel_labels[:, :gh * patch_size, :gw * patch_size].reshape(n, gh, patch_size, gw, patch_size)
    counts = torch.nn.functional.one_hot(patches.permute(0, 1, 3, 2, 4).flatten(3)).sum(3)
    return counts.argmax(-1)
