"""The embedded evaluation, on embedded labelled data (udi.digits or udi.scenes; nothing downloaded): image-level
k-NN and linear probe on cls and on cls+, and a dense linear probe on the patch tokens (per-patch accuracy and
mIoU), all on frozen features, fit on the train split and scored on the held-out split (udi.data.LABELLED_DATA):

    python -m udi.eval_embedded --pretrained_weights out/checkpoint.pth [--embedded_data digits] [--output m.json]

Metrics (%): knn_cls / knn_cls_plus (weighted 20-NN, DINO's protocol), linear_cls / linear_cls_plus
(udi.eval_linear), dense_accuracy / dense_miou (udi.eval_dense, 11 classes: background + 10 digits or shapes).
A backbone with one class token (--objective dino) has no cls+ metrics.
"""
import json
import os
from typing import Optional

import torch.nn.functional as F

from .data import check_labelled_data
from .eval_dense import dense_metrics
from .eval_knn import knn_classify
from .eval_linear import linear_probe
from .evaluation import (checkpoint_parser, embedded_checkpoint, embedded_splits, parse_checkpoint_args, print_metrics,
                         run_main)
from .flags import output_file

METRICS = ("knn_cls", "knn_cls_plus", "linear_cls", "linear_cls_plus", "dense_accuracy", "dense_miou")


def evaluate(backbone, image_size: int, device, data: str = "digits", train_count: Optional[int] = None,
             test_count: Optional[int] = None) -> dict:
    """The metrics of METRICS (%) for a backbone (udi.model.ViTBackbone) at `image_size` pixels on the embedded
    labelled data `data`, probes fit on its first `train_count` train images (default: LABELLED_DATA's; the dense
    probe on eval_dense.DENSE_TRAIN_IMAGES of them at most) and scored on its first `test_count` held-out images
    (default: LABELLED_DATA's)."""
    check_labelled_data(data)
    train, test = embedded_splits(backbone, image_size, device, data, train_count, test_count)
    metrics = {}
    for token, features in train["tokens"].items():
        metrics[f"knn_{token}"] = knn_classify(F.normalize(features, dim=-1), train["labels"],
                                               F.normalize(test["tokens"][token], dim=-1), test["labels"])
        metrics[f"linear_{token}"] = linear_probe(features, train["labels"], test["tokens"][token], test["labels"])
    metrics.update(dense_metrics(train, test, data))
    return {name: metrics[name] for name in METRICS if name in metrics}


def main(argv=None):
    p = checkpoint_parser("UDI evaluation on embedded labelled data (image-level and dense)", data_path=False)
    p.add_argument("--output", default=None, type=output_file, help="also write the metrics to this JSON file")
    args = parse_checkpoint_args(p, argv)
    metrics = evaluate(*embedded_checkpoint(args))
    print_metrics(metrics)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    run_main(main)
