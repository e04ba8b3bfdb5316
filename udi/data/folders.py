"""ImageFolder data: reading a picture (the policy for unreadable images: the run stops, naming the file), a
folder's images, and the two sides of an evaluation on labelled data, which never share an image: train/ and val/,
a seeded held-out part of one folder (--holdout_fraction), or the embedded labelled data's splits."""
import os

import torch

from ..errors import RunError, UnreadableImage
from .augmentation import eval_transform
from .labelled import LABELLED_DATA, LabelledImages, check_labelled_data


def read_image(path: str):
    """An image file -> an RGB PIL image, fully decoded; UnreadableImage naming the file when it cannot be read
    (truncated, not an image). The policy for unreadable images: the run stops, naming the file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot read the image {path} ({type(error).__name__}: {error}); remove or replace "
                              "it") from None


def image_folder(path: str, flag: str, transform=None):
    """torchvision's ImageFolder at `path` (class folders of pictures) reading with read_image; RunError naming
    `flag` and the folder when it has no class folder or no picture."""
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(path, transform=transform, loader=read_image)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise RunError(f"{flag} {path}: no images found ({error}); an ImageFolder holds one folder per class of "
                       "pictures (.jpg, .png, ...)") from None


def labelled_dataset(path, train: bool, size: int, data: str = "digits", flag: str = "--data_path"):
    """The ImageFolder `path/train` (train) or `path/val` or, with path None, the embedded labelled data `data`: its
    LABELLED_DATA counts of the train split (train) or of the held-out split. RunError naming `flag` when `path`
    lacks train/ or val/ (an evaluation never scores on the images it fit on)."""
    if path is None:
        check_labelled_data(data)
        train_count, held_out = LABELLED_DATA[data]
        return LabelledImages(data, "train" if train else "val", train_count if train else held_out, size)
    missing = [split for split in ("train", "val") if not os.path.isdir(os.path.join(path, split))]
    if missing:
        raise RunError(f"{flag} {path} needs the folders train/ (to fit on) and val/ (to score on); missing: "
                       f"{', '.join(s + '/' for s in missing)} (--holdout_fraction F holds out a part of a folder "
                       "without them)")
    split = os.path.join(path, "train" if train else "val")
    return image_folder(split, flag, transform=eval_transform(size))


HOLDOUT_SEED = 0  # the permutation of --holdout_fraction: the same split every time


def labelled_splits(path, size: int, data: str = "digits", holdout_fraction=None, flag: str = "--data_path"):
    """(train, val, description) of an evaluation: the embedded labelled data `data` (path None), the ImageFolders
    `path/train` and `path/val`, or with `holdout_fraction` (0 < f < 1) a seeded split of the ImageFolder `path`
    (that fraction held out to score on); the description "<data>: <which images each side holds>"."""
    if path is None or holdout_fraction is None:
        train, val = (labelled_dataset(path, split, size, data, flag) for split in (True, False))
        where = f"the embedded {data}" if path is None else path
        sides = "its train split" if path is None else os.path.join(path, "train")
        return train, val, (f"{where}: fit on {len(train)} images of {sides}, scored on {len(val)} of "
                            f"{'its held-out split' if path is None else os.path.join(path, 'val')}")
    folder = image_folder(path, flag, transform=eval_transform(size))
    held_out = min(max(1, round(holdout_fraction * len(folder))), len(folder) - 1)
    if held_out < 1:
        raise RunError(f"{flag} {path} has {len(folder)} image(s): too few to hold some out")
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    train, val = (torch.utils.data.Subset(folder, sorted(part)) for part in (order[held_out:], order[:held_out]))
    return train, val, (f"{path}: fit on {len(train)} images, scored on {held_out} held out ({holdout_fraction:g} of "
                        f"the folder, a permutation seeded {HOLDOUT_SEED}; no image on both sides)")
