"""Dense linear probe on frozen patch tokens: a linear classifier predicts each patch's class of embedded labelled
data (udi.digits or udi.scenes: 0 background, 1 + class; a patch takes its most frequent pixel class). Reports
per-patch accuracy and mIoU (%) on the held-out split:
`python -m udi.eval_dense --pretrained_weights out/checkpoint.pth [--embedded_data digits]`.

Patch tokens are the last block's outputs after the backbone's final norm (as DINO / iBOT linear segmentation),
standardised with the train split's statistics; the classifier is eval_linear's (AdamW, cosine lr, cross-entropy).
"""
import torch
from torch import Tensor

from .eval_linear import top1_predictions, train_linear


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


def main(argv=None):
    from .eval_embedded import evaluate_checkpoint, print_metrics
    from .eval_knn import checkpoint_parser
    args = checkpoint_parser("UDI dense linear probe on embedded labelled data", data_path=False).parse_args(argv)
    metrics = evaluate_checkpoint(args, image_level=False)
    print_metrics(metrics)
    return metrics


if __name__ == "__main__":
    from .eval_knn import run_main
    run_main(main)
