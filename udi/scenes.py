"""Generated scenes: labelled images with a class per image and a class per pixel, made deterministically from
a seed (nothing downloaded). The demo pre-trains on them and evaluates image-level and dense features on them.

A scene of `size x size` pixels has a textured background (a grating, a checkerboard or smooth blobs between two
random colours) and 1-3 drawn shapes out of the 10 classes of `SHAPES`: one large main object, whose class is the
image's label, and 0-2 smaller distractors of other classes. The pixel labels are 0 for the background and
1 + class where a shape covers the pixel centre (the main object is drawn last, on top). Colours, textures,
sizes, positions, rotations and aspect ratios are random and independent of the class, so only the silhouette
tells the classes apart. Shapes are antialiased (4 x 4 supersampling).

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


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """A texture in [0, 1] on the (supersampled) pixel grid x, y."""
    kind = rng.integers(3)
    theta = rng.uniform(0, math.pi)
    along = (x * math.cos(theta) + y * math.sin(theta)) / size
    if kind == 0:  # grating, 1.5-5 periods per image
        return 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(1.5, 5.0) * along + rng.uniform(0, 2 * math.pi))
    if kind == 1:  # checkerboard of 4-10 pixel cells at a random angle
        across = (-x * math.sin(theta) + y * math.cos(theta)) / size
        cells = size / rng.uniform(4, 10)
        return (np.floor(along * cells) + np.floor(across * cells)) % 2
    # smooth blobs: four plane waves of 1-3 periods per image in random directions
    waves = sum(np.sin(2 * math.pi * (fx * x + fy * y) / size + phase)
                for fx, fy, phase in rng.uniform([-3, -3, 0], [3, 3, 2 * math.pi], (4, 3)))
    return (waves - waves.min()) / max(waves.max() - waves.min(), 1e-6)


def _contrasting_colour(rng: np.random.Generator, background_luminance: float, gap: float = 0.3) -> np.ndarray:
    """A random RGB colour whose luminance differs from the background's by at least `gap` (so that the shape
    survives the grayscale augmentation)."""
    while True:
        colour = rng.uniform(0, 1, 3)
        if abs(_luminance(colour) - background_luminance) >= gap:
            return colour


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
    colours = rng.uniform(0, 1, (2, 3))
    colours[1] = colours[0] + rng.uniform(0.15, 0.35) * np.sign(rng.uniform(-1, 1, 3)) * rng.uniform(0.5, 1, 3)
    colours = np.clip(colours, 0, 1)
    texture = _background(rng, x, y, size)
    image = colours[0][:, None, None] * (1 - texture) + colours[1][:, None, None] * texture
    labels = np.zeros((fine, fine), dtype=np.int64)
    background_luminance = _luminance(colours.mean(0))

    main_class = int(rng.integers(NUM_CLASSES))
    main_radius = size * rng.uniform(0.24, 0.34)
    main_centre = _place(rng, size, main_radius)
    others = rng.permutation([c for c in range(NUM_CLASSES) if c != main_class])[:rng.integers(0, 3)]
    objects = [(int(c), size * rng.uniform(0.11, 0.16)) for c in others]
    for n, (cls, radius) in enumerate(objects + [(main_class, main_radius)]):
        centre = main_centre if n == len(objects) else _place(rng, size, radius, (main_centre, main_radius))
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        dx, dy = (x - centre[0]) / radius, (y - centre[1]) / radius
        u = (dx * math.cos(angle) + dy * math.sin(angle)) * aspect
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / aspect
        inside = _inside(SHAPES[cls], u, v)
        colour = _contrasting_colour(rng, background_luminance)[:, None, None]
        shading = 1 + 0.15 * np.clip(u - v, -1, 1)  # a soft gradient across the shape
        image = np.where(inside, np.clip(colour * shading, 0, 1), image)
        labels = np.where(inside, 1 + cls, labels)
    image = image.reshape(3, size, SUPERSAMPLING, size, SUPERSAMPLING).mean((2, 4))
    centre = SUPERSAMPLING // 2
    return image.astype(np.float32), main_class, labels[centre::SUPERSAMPLING, centre::SUPERSAMPLING]


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
