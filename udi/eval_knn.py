"""Weighted k-NN on frozen cls / cls+ features (DINO's protocol): `python -m udi.eval_knn --pretrained_weights
out/checkpoint.pth [--data_path /imagenet]` (ImageFolder with train/ and val/; default: the embedded labelled
data the checkpoint trained on, or the digits, udi.data.LABELLED_DATA). cls+ results are absent for a backbone with
one class token (--objective dino)."""
import argparse

import torch
import torch.nn.functional as F

from .checkpoint import verify
from .data import LABELLED_DATA
from .folders import labelled_splits
from .errors import RunError, one_line
from .utils import checkpoint_with


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=128):
    """-> (cls [N, C], cls_plus [N, C] or None with one class token) L2-normalised, labels [N]."""
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    cls, cls_plus, labels = [], [], []
    for images, targets in loader:
        out = backbone(images.to(device))
        cls.append(F.normalize(out.cls.float(), dim=-1).cpu())
        if out.cls_plus is not None:
            cls_plus.append(F.normalize(out.cls_plus.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(cls), torch.cat(cls_plus) if cls_plus else None, torch.cat(labels)


def knn_classify(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07):
    """Top-1 accuracy (%) of the similarity-weighted vote of the k nearest (cosine) training features."""
    num_classes = int(train_labels.max()) + 1
    similarity = test_features @ train_features.t()
    top_sim, top_idx = similarity.topk(min(k, len(train_labels)), dim=1)
    votes = torch.zeros(len(test_labels), num_classes)
    votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
    return 100.0 * (votes.argmax(1) == test_labels).float().mean().item()


def split_features(backbone, data_path, image_size, device, data="digits", holdout_fraction=None):
    """Frozen features of the train and the val side of an evaluation (udi.data.labelled_splits: the ImageFolders
    data_path/train and data_path/val, a held-out part of data_path, or the embedded labelled data `data`): two
    (cls, cls_plus, labels) triples and the description of which images each side holds."""
    train, val, description = labelled_splits(data_path, image_size, data, holdout_fraction)
    return extract_features(backbone, train, device), extract_features(backbone, val, device), description


def evaluation_data(args, train_args) -> str:
    """The embedded labelled data of an evaluation: --embedded_data, else the checkpoint's (embedded_data_of)."""
    return args.embedded_data or embedded_data_of(train_args)


def embedded_data_of(train_args) -> str:
    """The embedded labelled data a checkpoint trained on, or the digits (ImageFolder or unlabelled pictures)."""
    data = getattr(train_args, "embedded_data", None)
    return data if data in LABELLED_DATA and not getattr(train_args, "data_path", None) else "digits"


def knn_accuracies(backbone, data_path, image_size, device, k=20, temperature=0.07, data="digits") -> dict:
    """Top-1 (%) of the weighted k-NN on cls and on cls+ features, with what it ran on: dict(cls, cls_plus, k,
    data, train_images, val_images)."""
    train, test, description = split_features(backbone, data_path, image_size, device, data)
    accuracies = {name: knn_classify(train[i], train[2], test[i], test[2], k, temperature)
                  for i, name in enumerate(("cls", "cls_plus")) if train[i] is not None}
    return dict(accuracies, k=k, data=description.split(": ")[0], sides=description, train_images=len(train[2]),
                val_images=len(test[2]))


def load_backbone(path, checkpoint_key="teacher"):
    """The backbone of a udi.train checkpoint (its args rebuild the architecture) and those args."""
    from .model import build_model
    checkpoint = checkpoint_with(path, ("args", checkpoint_key))
    verify(checkpoint, path, (checkpoint_key,))
    model = build_model(argparse.Namespace(**checkpoint["args"]))
    model.load_state_dict(checkpoint[checkpoint_key])
    return model.backbone, argparse.Namespace(**checkpoint["args"])


def checkpoint_parser(description, data_path: bool = True):
    """The arguments every evaluation takes: which checkpoint, which data (unless data_path=False: embedded
    labelled data only), which image size."""
    p = argparse.ArgumentParser(description)
    p.add_argument("--pretrained_weights", required=True, help="a udi.train checkpoint")
    p.add_argument("--checkpoint_key", default="teacher", help="the network to evaluate: teacher or student")
    if data_path:
        p.add_argument("--data_path", default=None,
                       help="labelled ImageFolder root with train/ (fit on) and val/ (scored on); default: "
                            "--embedded_data")
        p.add_argument("--holdout_fraction", default=None, type=holdout_fraction,
                       help="without train/ and val/: hold out this fraction of --data_path's images (a seeded "
                            "split) to score on, fitting on the rest")
    p.add_argument("--embedded_data", default=None, choices=sorted(LABELLED_DATA),
                   help="embedded labelled data (udi.digits, udi.scenes); default: the one the checkpoint trained "
                        "on, or digits")
    p.add_argument("--image_size", default=None, type=int,
                   help="evaluation image side (floored to a multiple of the patch size, as in training); default: "
                        "the checkpoint's global crop size")
    return p


def holdout_fraction(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value}")
    return number


def checkpoint_features(args):
    """Train and val features of the checkpoint's backbone on the data of `args` (a checkpoint_parser result),
    and the description of which images each side holds (printed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    data = evaluation_data(args, train_args)
    train, test, description = split_features(backbone.to(device), getattr(args, "data_path", None),
                                              args.image_size or train_args.global_crop_size, device, data,
                                              getattr(args, "holdout_fraction", None))
    print(description)
    return train, test, description


def run_main(main, argv=None):
    """main(argv), a RunError reported as one line on stderr and exit status 1 (no traceback)."""
    try:
        return main(argv)
    except RunError as error:
        raise SystemExit(f"error: {one_line(error)}") from None


def knn_main(argv=None):
    p = checkpoint_parser("UDI weighted k-NN")
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="the k values to evaluate")
    p.add_argument("--temperature", default=0.07, type=float, help="temperature of the similarity-weighted vote")
    args = p.parse_args(argv)
    train, test, description = checkpoint_features(args)
    for k in args.nb_knn:
        accs = [f"{name} {knn_classify(train[i], train[2], test[i], test[2], k, args.temperature):.2f} %"
                for i, name in enumerate(("cls", "cls+")) if train[i] is not None]
        print(f"{k}-NN top-1 on {description.split(': ')[0]} ({len(train[2])} train, {len(test[2])} val images): "
              f"{', '.join(accs)}")


def main(argv=None):
    return run_main(knn_main, argv)


if __name__ == "__main__":
    main()
