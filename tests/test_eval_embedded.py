"""The embedded labelled data (digits, generated scenes), the dense probe and the embedded evaluation (issue 12), on
the CPU in a few seconds."""
import numpy as np
import pytest
import torch

from udi.data import LABELLED_DATA, LabelledImages, class_names, labelled_images
from udi.data.folders import labelled_dataset
from udi.digits import TRAIN_DIGITS, generate_digits
from udi.eval_dense import accuracy_and_miou, dense_probe
from udi.scenes import NUM_CLASSES, generate_scenes, patch_labels, render_scene


def test_scenes_are_deterministic_labelled_and_split():
    images, labels, pixels = generate_scenes(6, 32, "train", 0)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert labels.shape == (6,) and pixels.shape == (6, 32, 32)
    assert int(pixels.min()) == 0 and int(pixels.max()) <= NUM_CLASSES
    for i in range(6):
        assert (pixels[i] == 1 + labels[i]).any(), "the main object is in the picture"
    again = render_scene(np.random.default_rng([0, 0, 3]), 32)
    assert np.array_equal(again[0], images[3].numpy()) and again[1] == labels[3]
    held_out = generate_scenes(6, 32, "val", 0)[0]
    assert not torch.equal(held_out, images)
    with pytest.raises(ValueError, match="split"):
        generate_scenes(2, 32, "test", 0)


def test_digits_are_scikit_learns_upscaled_split_and_labelled_per_pixel():
    from sklearn.datasets import load_digits
    train, held_out = LABELLED_DATA["digits"]
    images, labels, pixels = generate_digits(train, 32, "train")
    val_images, val_labels, _ = generate_digits(held_out, 32, "val")
    assert train == TRAIN_DIGITS and train + held_out == 1797
    assert images.shape == (train, 3, 32, 32) and images.dtype == torch.float32 and pixels.shape == (train, 32, 32)
    assert torch.equal(images[:, 0], images[:, 2]) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert sorted(torch.bincount(torch.cat([labels, val_labels])).tolist()) == sorted(
        np.bincount(load_digits().target).tolist())
    # each image is one of scikit-learn's 8 x 8 digits with its label, and no digit is in both splits
    source = load_digits()
    small = torch.nn.functional.avg_pool2d(images[:, :1], 4)  # back to 8 x 8 (4 x 4 blocks of the upscaled image)
    reference = torch.from_numpy(source.images).float()[:, None] / 16
    nearest = torch.cdist(small.flatten(1), reference.flatten(1)).argmin(1)
    assert torch.equal(torch.from_numpy(source.target)[nearest], labels)
    val_nearest = torch.cdist(torch.nn.functional.avg_pool2d(val_images[:, :1], 4).flatten(1),
                              reference.flatten(1)).argmin(1)
    assert not set(nearest.tolist()) & set(val_nearest.tolist())
    ink = images[:, 0] >= 0.5
    assert torch.equal(pixels, torch.where(ink, 1 + labels[:, None, None], 0))
    assert ink.flatten(1).any(1).all(), "every digit has ink"
    assert torch.equal(labelled_images("digits", 5, 32, "train")[0], images[:5])
    with pytest.raises(ValueError, match="the train split holds 1280 digits, 1281 were asked for"):
        generate_digits(TRAIN_DIGITS + 1, 32, "train")
    with pytest.raises(ValueError, match="split"):
        generate_digits(2, 32, "test")
    for unknown in (lambda: labelled_images("mnist", 2, 32, "train"), lambda: class_names("images"),
                    lambda: labelled_dataset(None, True, 32, "images")):
        with pytest.raises(ValueError, match="data must be one of"):
            unknown()
    dataset = LabelledImages("digits", "val", 3, 16)
    assert len(dataset) == 3 and dataset[2][0].shape == (3, 16, 16) and int(dataset[2][1]) == int(val_labels[2])


def test_patch_labels_take_the_most_frequent_class():
    pixels = torch.zeros(1, 4, 4, dtype=torch.int64)
    pixels[0, :2, :2] = torch.tensor([[3, 3], [3, 0]])  # 3 of 4 pixels: class 3
    pixels[0, :2, 2:] = torch.tensor([[5, 0], [0, 0]])  # 1 of 4: background
    pixels[0, 2:, :2] = torch.tensor([[2, 2], [4, 4]])  # a tie: the smaller class
    assert patch_labels(pixels, 2).tolist() == [[[3, 0], [2, 0]]]


def test_accuracy_and_miou_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    metrics = accuracy_and_miou(predicted, target, 4)  # class 3 absent from both: left out of the mean
    # IoU: class 0: 1 / 3, class 1: 2 / 3, class 2: 0 / 1
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)


def _tokens(gen, n, labels, planted: bool, classes, dim=16):
    noise = torch.randn(n, labels.shape[1], dim, generator=gen)
    if not planted:
        return noise
    return noise * 0.3 + torch.nn.functional.one_hot(labels, dim).float()[..., :dim] * 2.0


@pytest.mark.parametrize("planted", [True, False])
def test_dense_probe_finds_a_planted_signal_and_nothing_in_noise(planted):
    gen = torch.Generator().manual_seed(0)
    classes, n, patches = 5, 60, 16
    labels = torch.randint(0, classes, (2 * n, patches), generator=gen)
    tokens = _tokens(gen, 2 * n, labels, planted, classes)
    metrics = dense_probe(tokens[:n], labels[:n], tokens[n:], labels[n:], classes, epochs=20, batch_size=256)
    if planted:
        assert metrics["accuracy"] > 99 and metrics["miou"] > 98, metrics
    else:  # chance: 20 %
        assert 10 < metrics["accuracy"] < 30 and metrics["miou"] < 20, metrics


def test_probes_do_not_depend_on_the_global_random_state():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (40, 9), generator=gen)
    tokens = _tokens(gen, 40, labels, False, 4)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(dense_probe(tokens[:20], labels[:20], tokens[20:], labels[20:], 4, epochs=3))
    assert results[0] == results[1]
