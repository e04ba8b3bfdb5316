"""The embedded evaluation, on embedded labelled data (udi.digits or udi.scenes; nothing downloaded): image-level
k-NN and linear probe on cls and on cls+, and a dense linear probe on the patch tokens (per-patch accuracy and
mIoU), all on frozen features, fit on the train split and scored on the held-out split (udi.data.LABELLED_DATA):

    python -m udi.eval_embedded --pretrained_weights out/checkpoint.pth [--embedded_data digits] [--output m.json]

Metrics (%): knn_cls / knn_cls_plus (weighted 20-NN, DINO's protocol), linear_cls / linear_cls_plus
(udi.eval_linear), dense_accuracy / dense_miou (udi.eval_dense, 11 classes: background + 10 digits or shapes).
A backbone with one class token (--objective dino) has no cls+ metrics.
"""
import json
from typing import Optional

import torch
import torch.nn.functional as F

from .data import LABELLED_DATA, check_labelled_data, class_names, labelled_images, normalize
from .eval_dense import dense_probe
from .eval_knn import checkpoint_parser, evaluation_data, knn_classify, load_backbone
from .eval_linear import linear_probe
from .scenes import patch_labels

DENSE_TRAIN_IMAGES = 1024  # at most this many train images for the dense probe (64 patches each at an 8 x 8 grid)
METRICS = ("knn_cls", "knn_cls_plus", "linear_cls", "linear_cls_plus", "dense_accuracy", "dense_miou")


@torch.no_grad()
def embedded_features(backbone, data: str, split: str, count: int, image_size: int, device,
                      batch_size: int = 256) -> dict:
    """Frozen features of `count` images of a split of the embedded labelled data `data`: cls, cls_plus [n, C]
    (cls_plus None with one class token), patch [n, N, C] after the final norm, labels [n], patch_labels [n, N]."""
    images, labels, pixels = labelled_images(data, count, image_size, split)
    backbone.eval()
    outputs = [backbone(normalize(batch).to(device)) for batch in images.split(batch_size)]
    cls_plus = None if outputs[0].cls_plus is None else torch.cat([o.cls_plus.float().cpu() for o in outputs])
    return dict(cls=torch.cat([o.cls.float().cpu() for o in outputs]), cls_plus=cls_plus,
                patch=torch.cat([backbone.vit.norm(o.patch).float().cpu() for o in outputs]), labels=labels,
                patch_labels=patch_labels(pixels, backbone.patch_size).flatten(1))


def evaluate(backbone, image_size: int, device, data: str = "digits", image_level: bool = True,
             dense: bool = True, train_count: Optional[int] = None, test_count: Optional[int] = None) -> dict:
    """The metrics of METRICS (%) for a backbone (udi.model.ViTBackbone) at `image_size` pixels on the embedded
    labelled data `data`, probes fit on its first `train_count` train images (default: LABELLED_DATA's; the dense
    probe on DENSE_TRAIN_IMAGES of them at most) and scored on its first `test_count` held-out images (default:
    LABELLED_DATA's)."""
    check_labelled_data(data)
    train_count = train_count or LABELLED_DATA[data][0]
    test_count = test_count or LABELLED_DATA[data][1]
    train = embedded_features(backbone, data, "train", train_count, image_size, device)
    test = embedded_features(backbone, data, "val", test_count, image_size, device)
    metrics = {}
    for token, suffix in (("cls", "cls"), ("cls_plus", "cls_plus")):
        if image_level and train[token] is not None:
            metrics[f"knn_{suffix}"] = knn_classify(F.normalize(train[token], dim=-1), train["labels"],
                                                    F.normalize(test[token], dim=-1), test["labels"])
            metrics[f"linear_{suffix}"] = linear_probe(train[token], train["labels"], test[token], test["labels"])
    if dense:
        probe = dense_probe(train["patch"][:DENSE_TRAIN_IMAGES], train["patch_labels"][:DENSE_TRAIN_IMAGES],
                            test["patch"], test["patch_labels"], 1 + len(class_names(data)))
        metrics.update(dense_accuracy=probe["accuracy"], dense_miou=probe["miou"])
    return {name: metrics[name] for name in METRICS if name in metrics}


def evaluate_checkpoint(args, image_level: bool = True, dense: bool = True) -> dict:
    """evaluate() for the checkpoint of `args` (an eval_knn.checkpoint_parser result)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    data = evaluation_data(args, train_args)
    train_count, held_out = LABELLED_DATA[data]
    print(f"{args.checkpoint_key} of {args.pretrained_weights} on the embedded {data}: probes fit on {train_count} "
          f"train images, scored on {held_out} held-out images")
    return evaluate(backbone.to(device), args.image_size or train_args.global_crop_size, device, data, image_level,
                    dense)


def print_metrics(metrics: dict):
    print("  ".join(f"{name} {value:.1f} %" for name, value in metrics.items()))


def main(argv=None):
    p = checkpoint_parser("UDI evaluation on embedded labelled data (image-level and dense)", data_path=False)
    p.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    metrics = evaluate_checkpoint(args)
    print_metrics(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    from .eval_knn import run_main
    run_main(main)
