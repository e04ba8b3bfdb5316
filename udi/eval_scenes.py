"""The embedded evaluation, on the generated scenes (udi.scenes; nothing downloaded): image-level k-NN and linear
probe on cls and on cls+, and a dense linear probe on the patch tokens (per-patch accuracy and mIoU), all on
frozen features, trained on the train split and scored on the held-out split:

    python -m udi.eval_scenes --pretrained_weights out/checkpoint.pth [--output metrics.json]

Metrics (%): knn_cls / knn_cls_plus (weighted 20-NN, DINO's protocol), linear_cls / linear_cls_plus
(udi.eval_linear), dense_accuracy / dense_miou (udi.eval_dense, 11 classes: background + 10 shapes). A backbone
with one class token (--objective dino) has no cls+ metrics.
"""
import json

import torch
import torch.nn.functional as F

from .data import SCENES_HELD_OUT, SCENES_SEED, normalize
from .eval_dense import dense_probe
from .eval_knn import checkpoint_parser, knn_classify, load_backbone
from .eval_linear import linear_probe
from .scenes import NUM_CLASSES, generate_scenes, patch_labels

TRAIN_SCENES = 2048        # the train split's first scenes (the demo pre-trains on them, labels unused)
DENSE_TRAIN_SCENES = 1024  # of those, the dense probe's (64 patches each at the demo's 8 x 8 grid)
METRICS = ("knn_cls", "knn_cls_plus", "linear_cls", "linear_cls_plus", "dense_accuracy", "dense_miou")


@torch.no_grad()
def scene_features(backbone, split: str, count: int, image_size: int, device, batch_size: int = 256) -> dict:
    """Frozen features of `count` scenes of a split: cls, cls_plus [n, C] (cls_plus None with one class token),
    patch [n, N, C] after the final norm, labels [n], patch_labels [n, N]."""
    images, labels, pixels = generate_scenes(count, image_size, split, SCENES_SEED)
    backbone.eval()
    outputs = [backbone(normalize(batch).to(device)) for batch in images.split(batch_size)]
    cls_plus = None if outputs[0].cls_plus is None else torch.cat([o.cls_plus.float().cpu() for o in outputs])
    return dict(cls=torch.cat([o.cls.float().cpu() for o in outputs]), cls_plus=cls_plus,
                patch=torch.cat([backbone.vit.norm(o.patch).float().cpu() for o in outputs]), labels=labels,
                patch_labels=patch_labels(pixels, backbone.patch_size).flatten(1))


def evaluate(backbone, image_size: int, device, image_level: bool = True, dense: bool = True,
             train_count: int = TRAIN_SCENES, test_count: int = SCENES_HELD_OUT) -> dict:
    """The metrics of METRICS (%) for a backbone (udi.model.ViTBackbone) at `image_size` pixels, probes trained on
    the first `train_count` train scenes (the dense one on DENSE_TRAIN_SCENES of them at most) and scored on
    the first `test_count` held-out scenes."""
    train = scene_features(backbone, "train", train_count, image_size, device)
    test = scene_features(backbone, "val", test_count, image_size, device)
    metrics = {}
    for token, suffix in (("cls", "cls"), ("cls_plus", "cls_plus")):
        if image_level and train[token] is not None:
            metrics[f"knn_{suffix}"] = knn_classify(F.normalize(train[token], dim=-1), train["labels"],
                                                    F.normalize(test[token], dim=-1), test["labels"])
            metrics[f"linear_{suffix}"] = linear_probe(train[token], train["labels"], test[token], test["labels"])
    if dense:
        probe = dense_probe(train["patch"][:DENSE_TRAIN_SCENES], train["patch_labels"][:DENSE_TRAIN_SCENES],
                            test["patch"], test["patch_labels"], 1 + NUM_CLASSES)
        metrics.update(dense_accuracy=probe["accuracy"], dense_miou=probe["miou"])
    return {name: metrics[name] for name in METRICS if name in metrics}


def evaluate_checkpoint(args, image_level: bool = True, dense: bool = True) -> dict:
    """evaluate() for the checkpoint of `args` (an eval_knn.checkpoint_parser result)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    return evaluate(backbone.to(device), args.image_size or train_args.global_crop_size, device, image_level, dense)


def print_metrics(metrics: dict):
    print("  ".join(f"{name} {value:.1f} %" for name, value in metrics.items()))


def main(argv=None):
    p = checkpoint_parser("UDI evaluation on the generated scenes (image-level and dense)", data_path=False)
    p.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    metrics = evaluate_checkpoint(args)
    print_metrics(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
