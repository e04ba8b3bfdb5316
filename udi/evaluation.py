"""What every evaluation shares (udi.eval_knn, eval_linear, eval_dense, eval_embedded, visualize, final_report):
the backbone of a udi.train checkpoint, the command line that names it and the data, the frozen features of the
two sides of an evaluation, and the one-line error of a command.

Features are by class token name: {"cls": [N, C], "cls_plus": [N, C]}, cls alone for a backbone with one class
token (--objective dino; udi.model.BackboneOutput.class_tokens), so that no evaluation asks which objective
trained the network."""
import argparse

import torch
import torch.nn.functional as F

from .checkpoint import verify
from .data import LABELLED_DATA, labelled_images, normalize
from .data.folders import labelled_splits
from .errors import RunError, one_line
from .model import build_model
from .scenes import patch_labels
from .utils import checkpoint_with

TOKEN_NAMES = {"cls": "cls", "cls_plus": "cls+"}  # how results name the class tokens


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(path, checkpoint_key="teacher"):
    """The backbone of a udi.train checkpoint (its args rebuild the architecture) and those args."""
    checkpoint = checkpoint_with(path, ("args", checkpoint_key))
    verify(checkpoint, path, (checkpoint_key,))
    model = build_model(argparse.Namespace(**checkpoint["args"]))
    model.load_state_dict(checkpoint[checkpoint_key])
    return model.backbone, argparse.Namespace(**checkpoint["args"])


def checkpoint_parser(description, data_path: bool = True):
    """The arguments every evaluation takes: which checkpoint, which data (unless data_path=False: embedded
    labelled data only), which image size."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_weights", required=True, help="a udi.train checkpoint")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="the network to evaluate")
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


def evaluation_data(args, train_args) -> str:
    """The embedded labelled data of an evaluation: --embedded_data, else the checkpoint's (embedded_data_of)."""
    return args.embedded_data or embedded_data_of(train_args)


def embedded_data_of(train_args) -> str:
    """The embedded labelled data a checkpoint trained on, or the digits (ImageFolder or unlabelled pictures)."""
    data = getattr(train_args, "embedded_data", None)
    return data if data in LABELLED_DATA and not getattr(train_args, "data_path", None) else "digits"


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=128):
    """-> (features {class token name: [N, C]} L2-normalised, labels [N])."""
    backbone.eval()
    features, labels = {}, []
    for images, targets in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        for name, token in backbone(images.to(device)).class_tokens().items():
            features.setdefault(name, []).append(F.normalize(token.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(targets))
    return {name: torch.cat(rows) for name, rows in features.items()}, torch.cat(labels)


def split_features(backbone, data_path, image_size, device, data="digits", holdout_fraction=None):
    """Frozen features of the train and the val side of an evaluation (udi.data.folders.labelled_splits: the
    ImageFolders data_path/train and data_path/val, a held-out part of data_path, or the embedded labelled data
    `data`): two (features, labels) pairs (extract_features) and the description of which images each side holds."""
    train, val, description = labelled_splits(data_path, image_size, data, holdout_fraction)
    return extract_features(backbone, train, device), extract_features(backbone, val, device), description


def checkpoint_features(args):
    """Train and val features of the checkpoint's backbone on the data of `args` (a checkpoint_parser result),
    and the description of which images each side holds (printed)."""
    device = default_device()
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    data = evaluation_data(args, train_args)
    train, test, description = split_features(backbone.to(device), getattr(args, "data_path", None),
                                              args.image_size or train_args.global_crop_size, device, data,
                                              getattr(args, "holdout_fraction", None))
    print(description)
    return train, test, description


@torch.no_grad()
def embedded_features(backbone, data: str, split: str, count: int, image_size: int, device,
                      batch_size: int = 256) -> dict:
    """Frozen features of `count` images of a split of the embedded labelled data `data`: the class tokens by name
    [n, C] (not normalised), patch [n, N, C] after the final norm, labels [n], patch_labels [n, N]."""
    images, labels, pixels = labelled_images(data, count, image_size, split)
    backbone.eval()
    outputs = [backbone(normalize(batch).to(device)) for batch in images.split(batch_size)]
    tokens = {name: torch.cat([o.class_tokens()[name].float().cpu() for o in outputs])
              for name in outputs[0].class_tokens()}
    return dict(tokens=tokens, patch=torch.cat([backbone.vit.norm(o.patch).float().cpu() for o in outputs]),
                labels=labels, patch_labels=patch_labels(pixels, backbone.patch_size).flatten(1))


def embedded_splits(backbone, image_size: int, device, data: str, train_count=None, test_count=None) -> tuple:
    """embedded_features of the first `train_count` train and `test_count` held-out images of `data` (default:
    LABELLED_DATA's counts)."""
    default_train, default_test = LABELLED_DATA[data]
    return (embedded_features(backbone, data, "train", train_count or default_train, image_size, device),
            embedded_features(backbone, data, "val", test_count or default_test, image_size, device))


def embedded_checkpoint(args) -> tuple:
    """The checkpoint of `args` (a checkpoint_parser(data_path=False) result) for an embedded evaluation, said in
    a line: (backbone on the device, image size, device, embedded labelled data)."""
    device = default_device()
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    data = evaluation_data(args, train_args)
    train_count, held_out = LABELLED_DATA[data]
    print(f"{args.checkpoint_key} of {args.pretrained_weights} on the embedded {data}: probes fit on {train_count} "
          f"train images, scored on {held_out} held-out images")
    return backbone.to(device), args.image_size or train_args.global_crop_size, device, data


def print_metrics(metrics: dict):
    print("  ".join(f"{name} {value:.1f} %" for name, value in metrics.items()))


def run_main(main, argv=None):
    """main(argv), a RunError reported as one line on stderr and exit status 1 (no traceback)."""
    try:
        return main(argv)
    except RunError as error:
        raise SystemExit(f"error: {one_line(error)}") from None
