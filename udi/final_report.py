"""udi.train's final report (--final_eval): after training on embedded labelled data (digits or scenes), the
embedded evaluation (udi.eval_embedded: k-NN and linear probe on cls / cls+, dense probe) of the teacher and of a
randomly initialised network and attention PNGs of both on held-out images of the same data; with
--knn_data_path also a k-NN on that labelled ImageFolder (train/, val/). After training on other data (an
ImageFolder, the unlabelled sample images) the embedded evaluation is skipped with the commands that evaluate the
checkpoint on labelled data of the user's choice."""
import json
import os

from . import utils
from .data import LABELLED_DATA
from .model import build_model

ATTENTION_IMAGES = 2  # held-out images drawn (python -m udi.visualize --num_images N for more)


def trained_on_labelled_data(args) -> bool:
    return args.data_path is None and args.embedded_data in LABELLED_DATA


def data_flag(args) -> str:
    return f"--data_path {args.data_path}" if args.data_path else f"--embedded_data {args.embedded_data}"


def skipped_lines(args) -> list:
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
    return [f"final evaluation skipped: the run trained on {data_flag(args)}, which has no labelled held-out split "
            "here. "
            "Evaluate the checkpoint on labelled data:",
            f"  python -m udi.eval_knn --pretrained_weights {checkpoint} --data_path LABELLED (train/ and val/, or "
            "--holdout_fraction 0.2)",
            f"  python -m udi.eval_embedded --pretrained_weights {checkpoint} --embedded_data digits",
            f"  python -m udi.visualize --pretrained_weights {checkpoint} --image_path PICTURE.jpg ... "
            f"--output_dir {os.path.join(args.output_dir, 'attention')}"]


def knn_line(name: str, result: dict) -> str:
    return (f"{result['k']}-NN top-1 on {result['data']}, {name}: "
            + ", ".join(f"{t} {result[t]:.1f} %" for t in ("cls", "cls_plus") if t in result))


def embedded_report(args, backbones: dict, device) -> dict:
    from .eval_embedded import evaluate
    from .evaluation import print_metrics
    from .visualize import held_out_images, save_attention_maps
    data = args.embedded_data
    train_count, held_out = LABELLED_DATA[data]
    report = {}
    for name, backbone in backbones.items():
        report[name] = evaluate(backbone, args.global_crop_size, device, data)
        print(f"{name}, {held_out} held-out {data} (probes fit on {train_count} train {data}, k-NN k = 20): ", end="")
        print_metrics(report[name])
    paths = save_attention_maps(backbones, os.path.join(args.output_dir, "attention"),
                                held_out_images(data, ATTENTION_IMAGES, args.global_crop_size), device)
    print(f"attention maps: {', '.join(paths)}")
    return dict(report, data=data)


def final_report(args, teacher, device) -> dict:
    """The report of the module docstring, printed, and written to output_dir/final_eval.json; {} when skipped."""
    from .eval_knn import knn_accuracies
    if not trained_on_labelled_data(args) and not args.knn_data_path:
        print("\n".join(skipped_lines(args)))
        return {}
    utils.fix_random_seeds(args.seed + 1)
    backbones = {"teacher": teacher.backbone, "random init": build_model(args).backbone.to(device)}
    report = embedded_report(args, backbones, device) if trained_on_labelled_data(args) else {}
    if args.knn_data_path:
        for name, backbone in backbones.items():
            result = knn_accuracies(backbone, args.knn_data_path, args.global_crop_size, device)
            report.setdefault(name, {})["knn_data_path"] = result
            print(knn_line(name, result))
    if not trained_on_labelled_data(args):
        print(f"embedded evaluation and attention maps skipped: the run trained on {data_flag(args)}, not on "
              "embedded labelled data")
    path = os.path.join(args.output_dir, "final_eval.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"evaluation results: {path}")
    return report
