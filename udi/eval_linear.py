"""Linear probe on frozen cls / cls+ features: `python -m udi.eval_linear --pretrained_weights out/checkpoint.pth
[--data_path /imagenet]` (ImageFolder with train/ and val/; default: embedded labelled data, udi.evaluation).

Features are extracted once (centre crops, no augmentation) and standardised with the train split's statistics;
one linear classifier per feature set (cls, cls+, and both concatenated) is trained with AdamW and a cosine
learning rate on mini-batches, and its top-1 accuracy on the val split is printed.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluation import TOKEN_NAMES, checkpoint_features, checkpoint_parser, parse_checkpoint_args, run_main
from .flags import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, int_in


def train_linear(features: Tensor, labels: Tensor, epochs=100, lr=1e-2, weight_decay=1e-4, batch_size=256,
                 seed=0, num_classes=None) -> nn.Linear:
    """A linear classifier features [N, C] -> logits [N, num_classes] (default: labels.max() + 1), trained with
    cross-entropy; initialised as DINO's eval_linear (weight N(0, 0.01), bias 0) and shuffled from `seed` alone, so
    the result does not depend on the global random state."""
    gen = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes or int(labels.max()) + 1)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=gen)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(batch_size):
            loss = F.cross_entropy(classifier(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier


@torch.no_grad()
def top1_predictions(classifier: nn.Linear, features: Tensor) -> Tensor:
    return classifier(features).argmax(1)


def top1(classifier: nn.Linear, features: Tensor, labels: Tensor) -> float:
    return 100.0 * (top1_predictions(classifier, features) == labels).float().mean().item()


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 **train_kwargs) -> float:
    """Top-1 accuracy (%) on the test split of a linear classifier trained on standardised train features."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    classifier = train_linear((train_features - mean) / std, train_labels, **train_kwargs)
    return top1(classifier, (test_features - mean) / std, test_labels)


def feature_sets(features: dict) -> dict:
    """Features by class token ({"cls": [N, C], "cls_plus": [N, C]}) -> the sets a probe is fit on, by their
    printed names: each token's, and with several tokens all of them concatenated ("cls ‖ cls+")."""
    sets = {TOKEN_NAMES[name]: value for name, value in features.items()}
    if len(sets) > 1:
        sets[" ‖ ".join(sets)] = torch.cat(list(sets.values()), 1)
    return sets


def linear_main(argv=None):
    p = checkpoint_parser("UDI linear probe")
    p.add_argument("--epochs", default=100, type=int_in(1, 100_000), help="epochs of the linear classifier")
    p.add_argument("--lr", default=1e-2, type=POSITIVE_FLOAT, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--weight_decay", default=1e-4, type=NON_NEGATIVE_FLOAT, help="AdamW weight decay")
    p.add_argument("--batch_size", default=256, type=int_in(1, 2 ** 20), help="mini-batch size")
    args = parse_checkpoint_args(p, argv)
    train, test, _ = checkpoint_features(args)
    train_sets, test_sets = feature_sets(train[0]), feature_sets(test[0])
    results = {}
    for name in train_sets:
        results[name] = linear_probe(train_sets[name], train[1], test_sets[name], test[1], epochs=args.epochs,
                                     lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size)
        print(f"linear top-1 ({name}): {results[name]:.2f} %")
    return results


def main(argv=None):
    return run_main(linear_main, argv)


if __name__ == "__main__":
    main()
