"""Dense linear probe on frozen patch tokens: a linear classifier predicts each patch's class of embedded labelled
data (udi.digits or udi.scenes: 0 background, 1 + class; a patch takes its most frequent pixel class). Reports
per-patch accuracy and mIoU (%) on the held-out split:
`python -m udi.eval_dense --pretrained_weights out/checkpoint.pth [--embedded_data digits]`.

Patch tokens are the last block's outputs after the backbone's final norm (as DINO / iBOT linear segmentation),
standardised with the train split's statistics; the classifier is eval_linear's (AdamW, cosine lr, cross-entropy).
"""
import torch
from torch import Tensor

from .data import class_names
from .eval_linear import top1_predictions, train_linear
from .evaluation import (checkpoint_parser, embedded_checkpoint, embedded_splits, parse_checkpoint_args, print_metrics,
                         run_main)

DENSE_TRAIN_IMAGES = 1024  # at most this many train images for the dense probe (64 patches each at an 8 x 8 grid)


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """[num_classes, num_classes] int64 counts, rows the true class, columns the predicted one."""
    return torch.bincount(target.flatten() * num_classes + predicted.flatten(),
                          minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_and_miou(predicted: Tensor, target: Tensor, num_classes: int) -> dict:
    """Per-patch accuracy and mean IoU (%), the mean over the classes present in target or prediction."""
    confusion = confusion_matrix(predicted, target, num_classes).double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return {"accuracy": 100.0 * float(true_positive.sum() / confusion.sum()),
            "miou": 100.0 * float((true_positive[present] / union[present]).mean())}


def dense_probe(train_tokens: Tensor, train_labels: Tensor, test_tokens: Tensor, test_labels: Tensor,
                num_classes: int, epochs: int = 10, lr: float = 1e-2, batch_size: int = 1024, seed: int = 0) -> dict:
    """Tokens [n, N, C] with labels [n, N] (int64 in [0, num_classes)) -> {"accuracy", "miou"} (%) on the test
    tokens of a linear classifier trained on the standardised train tokens."""
    train, test = train_tokens.flatten(0, 1).float(), test_tokens.flatten(0, 1).float()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    classifier = train_linear((train - mean) / std, train_labels.flatten(), epochs=epochs, lr=lr,
                              batch_size=batch_size, seed=seed, num_classes=num_classes)
    return accuracy_and_miou(top1_predictions(classifier, (test - mean) / std), test_labels.flatten(), num_classes)


def dense_metrics(train: dict, test: dict, data: str) -> dict:
    """dense_accuracy and dense_miou (%) of dense_probe on udi.evaluation.embedded_features of the embedded
    labelled data `data` (fit on DENSE_TRAIN_IMAGES train images at most), background + its classes."""
    probe = dense_probe(train["patch"][:DENSE_TRAIN_IMAGES], train["patch_labels"][:DENSE_TRAIN_IMAGES],
                        test["patch"], test["patch_labels"], 1 + len(class_names(data)))
    return dict(dense_accuracy=probe["accuracy"], dense_miou=probe["miou"])


def main(argv=None):
    args = parse_checkpoint_args(checkpoint_parser("UDI dense linear probe on embedded labelled data",
                                                   data_path=False), argv)
    backbone, image_size, device, data = embedded_checkpoint(args)
    metrics = dense_metrics(*embedded_splits(backbone, image_size, device, data), data)
    print_metrics(metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
