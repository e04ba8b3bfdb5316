"""Weighted k-NN on frozen cls / cls+ features (DINO's protocol): `python -m udi.eval_knn --pretrained_weights
out/checkpoint.pth [--data_path /imagenet]` (ImageFolder with train/ and val/; default: the embedded labelled
data the checkpoint trained on, or the digits, udi.data.LABELLED_DATA). cls+ results are absent for a backbone with
one class token (--objective dino). The checkpoint, the data and the features are udi.evaluation's."""
import torch

from .evaluation import (TOKEN_NAMES, checkpoint_features, checkpoint_parser, parse_checkpoint_args, run_main,
                         split_features)
from .flags import POSITIVE_FLOAT, int_in


def neighbours(k: int, train_images: int) -> int:
    """The k a k-NN votes with: k, or every training image when there are fewer."""
    return min(k, train_images)


def knn_classify(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07):
    """Top-1 accuracy (%) of the similarity-weighted vote of the k nearest (cosine) training features (all of them
    when there are fewer than k: neighbours(k, len(train_labels))), weights exp(similarity / temperature) as in
    DINO's eval_knn.py, formed relative to each row's nearest so that no temperature overflows them."""
    num_classes = int(train_labels.max()) + 1
    similarity = test_features @ train_features.t()
    top_sim, top_idx = similarity.topk(neighbours(k, len(train_labels)), dim=1)
    votes = torch.zeros(len(test_labels), num_classes)
    # DINO's weights exp(sim / T), each row divided by its largest (the vote is the same): finite at any T
    votes.scatter_add_(1, train_labels[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())
    return 100.0 * (votes.argmax(1) == test_labels).float().mean().item()


def knn_by_token(train, test, k=20, temperature=0.07) -> dict:
    """train, test: (features by class token, labels) (udi.evaluation.extract_features) -> top-1 (%) by token."""
    return {name: knn_classify(features, train[1], test[0][name], test[1], k, temperature)
            for name, features in train[0].items()}


def knn_accuracies(backbone, data_path, image_size, device, k=20, temperature=0.07, data="digits") -> dict:
    """Top-1 (%) of the weighted k-NN on cls and on cls+ features, with what it ran on: dict(cls, cls_plus, k (the
    k used: neighbours(k, train images)), data, train_images, val_images)."""
    train, test, description = split_features(backbone, data_path, image_size, device, data)
    return dict(knn_by_token(train, test, k, temperature), k=neighbours(k, len(train[1])),
                data=description.split(": ")[0], sides=description, train_images=len(train[1]),
                val_images=len(test[1]))


def knn_main(argv=None):
    p = checkpoint_parser("UDI weighted k-NN")
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int_in(1, 10 ** 6),
                   help="the k values to evaluate (a k above the train images votes with all of them, and says so)")
    p.add_argument("--temperature", default=0.07, type=POSITIVE_FLOAT,
                   help="temperature of the similarity-weighted vote")
    args = parse_checkpoint_args(p, argv)
    train, test, description = checkpoint_features(args)
    for asked in args.nb_knn:
        k = neighbours(asked, len(train[1]))
        accs = [f"{TOKEN_NAMES[name]} {accuracy:.2f} %"
                for name, accuracy in knn_by_token(train, test, k, args.temperature).items()]
        capped = f" (--nb_knn {asked} capped at the train images)" if k < asked else ""
        print(f"{k}-NN{capped} top-1 on {description.split(': ')[0]} ({len(train[1])} train, {len(test[1])} val "
              f"images): {', '.join(accs)}")


def main(argv=None):
    return run_main(knn_main, argv)


if __name__ == "__main__":
    main()
