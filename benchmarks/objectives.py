"""UDI against DINO on image-level and dense quality (issue 12), on the generated scenes (udi.scenes):

    python -m benchmarks.objectives [--preset cpu|gpu] [--seeds 0 1 2] [--jobs N] [--record]

Trains `udi.train --objective udi` and `--objective dino` (same backbone, data, augmentation, schedule and number
of steps; DINO with one class token and no SRS head) for every seed, evaluates each teacher and a randomly
initialised network with udi.eval_embedded (k-NN and linear probe on cls and cls+, dense linear probe on the
patch tokens: per-patch accuracy and mIoU), prints a table of mean ± std over the seeds and writes
objectives_<preset>.json / .png to benchmarks/out/ (ignored by git), or to benchmarks/results/ with --record.

Presets: `cpu` (the default: the demo's network, crops and temperatures, 2 epochs of 16 steps of 32 images per
training, minutes on 2 CPU cores for 2 objectives x 3 seeds) and `gpu` (the demo's network, 60 epochs of 64 steps
of 128 images). Trainings run in `--jobs` processes at once (single-threaded on a CPU machine by default).
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import torch

from udi import utils
from udi.cli import parse_args
from udi.flags import SEED, HelpFormatter, int_in
from udi.eval_embedded import METRICS, evaluate
from udi.model import build_model
from udi.train import train_udi

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ("udi", "dino")
DATA = "scenes"  # training and evaluation data: the generated scenes, with per-pixel classes for the dense probe
# udi.train flags on top of the demo preset
PRESETS = {
    "cpu": ["--embedded_data", DATA, "--epochs", "2", "--warmup_epochs", "1", "--embedded_images", "512"],
    "gpu": ["--embedded_data", DATA, "--epochs", "60", "--warmup_epochs", "5", "--batch_size_per_gpu", "128",
            "--embedded_images", "8192"],
}


def train_and_evaluate(objective: str, seed: int, flags: list, workdir: str, threads: int) -> dict:
    """Train one objective with one seed (udi.train flags on top of the demo preset) in `threads` threads;
    -> dict(metrics, train_seconds, train_cpu_seconds, last_epoch (its log record), args)."""
    torch.set_num_threads(threads)
    output_dir = os.path.join(workdir, f"{objective}_seed{seed}")
    args = parse_args(["--preset", "demo", "--objective", objective, "--seed", str(seed), "--output_dir",
                       output_dir, "--final_eval", "false", *flags])
    start, cpu_start = time.time(), time.process_time()
    _, teacher = train_udi(args)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - cpu_start
    device = next(teacher.parameters()).device
    with open(os.path.join(output_dir, "log.txt")) as f:
        last_epoch = json.loads(f.readlines()[-1])
    return dict(metrics=evaluate(teacher.backbone, args.global_crop_size, device, DATA), train_seconds=train_seconds,
                train_cpu_seconds=train_cpu_seconds, last_epoch=last_epoch, args=vars(args))


def evaluate_random(seed: int, args_dict: dict) -> dict:
    """A randomly initialised UDI backbone (seed) of the same architecture."""
    utils.fix_random_seeds(seed)
    args = argparse.Namespace(**args_dict)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dict(metrics=evaluate(build_model(args).backbone.to(device), args.global_crop_size, device, DATA))


def summarise(runs: dict) -> dict:
    """runs: name -> [per-seed run] -> name -> metric -> (mean, std over seeds)."""
    summary = {}
    for name, seeds in runs.items():
        summary[name] = {}
        for metric in METRICS:
            values = [run["metrics"][metric] for run in seeds if metric in run["metrics"]]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[name][metric] = (statistics.mean(values), std)
    return summary


def table(summary: dict) -> str:
    names = list(summary)
    lines = [f"{'metric (%)':<18}" + "".join(f"{name:>16}" for name in names)]
    for metric in METRICS:
        cells = [(f"{summary[n][metric][0]:.1f} ± {summary[n][metric][1]:.1f}" if metric in summary[n] else "—")
                 for n in names]
        lines.append(f"{metric:<18}" + "".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)


def chart(summary: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(summary)
    for k, (name, metrics) in enumerate(summary.items()):
        xs = [i + k * width for i, metric in enumerate(METRICS) if metric in metrics]
        present = [metric for metric in METRICS if metric in metrics]
        ax.bar(xs, [metrics[m][0] for m in present], width, yerr=[metrics[m][1] for m in present], capsize=3,
               label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], METRICS, rotation=15)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="schedule and batch (see above)")
    p.add_argument("--seeds", default=[0, 1, 2], type=SEED, nargs="+", help="training seeds")
    p.add_argument("--record", action="store_true", help="write into benchmarks/results/ (tracked)")
    p.add_argument("--output_dir", default=os.path.join(HERE, "out"), help="where results go without --record")
    p.add_argument("--jobs", default=2 if not torch.cuda.is_available() else 1, type=int_in(1, 64),
                   help="trainings run at the same time, in processes of torch.get_num_threads() // jobs threads "
                        "each (2 on a CPU machine, 1 with a GPU)")
    args = p.parse_args(argv)
    out_dir = os.path.join(HERE, "results") if args.record else args.output_dir
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    threads = max(1, torch.get_num_threads() // args.jobs)
    with tempfile.TemporaryDirectory() as workdir, \
            concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(objective, seed): pool.submit(train_and_evaluate, objective, seed, PRESETS[args.preset], workdir,
                                                   threads)
                   for seed in args.seeds for objective in OBJECTIVES}
        runs = {objective: [futures[objective, seed].result() for seed in args.seeds] for objective in OBJECTIVES}
    runs["random init"] = [evaluate_random(seed + 1000, run["args"]) for seed, run in zip(args.seeds, runs["udi"])]
    runs = {name: runs[name] for name in ("random init", "dino", "udi")}
    summary = summarise(runs)
    steps = runs["udi"][0]["args"]
    title = (f"generated scenes, {len(args.seeds)} seeds, preset {args.preset}: {steps['epochs']} epochs x "
             f"{steps['embedded_images'] // steps['batch_size_per_gpu']} steps of {steps['batch_size_per_gpu']} "
             f"images, ViT {steps['embed_dim']}-d x {steps['depth']}, patch {steps['patch_size']}")
    record = dict(benchmark="objectives", preset=args.preset, seeds=args.seeds, title=title,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                  device=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), jobs=args.jobs, wall_seconds=time.time() - start,
                  summary={n: {m: dict(mean=v[0], std=v[1]) for m, v in s.items()} for n, s in summary.items()},
                  runs={n: [{k: v for k, v in r.items() if k != "args"} for r in rs] for n, rs in runs.items()},
                  train_args={k: v for k, v in steps.items() if k not in ("seed", "output_dir", "objective")})
    path = os.path.join(out_dir, f"objectives_{args.preset}")
    with open(path + ".json", "w") as f:
        json.dump(record, f, indent=1)
    chart(summary, path + ".png", title)
    print(f"wrote {path}.json, {path}.png ({record['wall_seconds']:.0f} s)\n{title}\n{table(summary)}")
    return record


if __name__ == "__main__":
    main()
