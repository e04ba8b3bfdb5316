"""The embedded labelled data (udi.digits, udi.scenes; nothing downloaded): their splits, class names and the
labelled data set evaluations read."""
import torch

from .augmentation import normalize

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
        from ..digits import generate_digits
        return generate_digits(count, size, split)
    from ..scenes import generate_scenes
    return generate_scenes(count, size, split, SCENES_SEED)


def class_names(data: str) -> tuple:
    """The class names of the embedded labelled data `data`."""
    check_labelled_data(data)
    from ..digits import CLASS_NAMES
    from ..scenes import SHAPES
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
