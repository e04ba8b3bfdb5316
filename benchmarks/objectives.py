"""UDI against DINO on image-level and dense quality (issues 12 and 24), where training learns: the embedded digits.

    python -m benchmarks.objectives [--seeds 0 1 2] [--jobs N] [--record] [--train_flags "--epochs 32 ..."]

Trains `udi.train --preset demo --objective udi` and `--objective dino` (same backbone, head, crops, schedule and
number of steps; DINO with one class token and no SRS head) for every seed on scikit-learn's digits (udi.digits),
evaluates each teacher and a randomly initialised network of the same architecture (one per seed) with
udi.eval_embedded on the held-out digits (k-NN and linear probe on cls and cls+, dense linear probe on the patch
tokens: per-patch accuracy and mIoU), and prints mean ± std over the seeds, each objective's margin over the random
network and the UDI − DINO difference with whether it exceeds the seed-to-seed spread. Writes objectives_cpu.json
/ .png to benchmarks/out/ (ignored by git), or to benchmarks/results/ with --record.

The generated scenes (udi.scenes) are not part of it: at the budget of a CPU run neither objective moved off the
random network there (benchmarks/NOTES.md, "UDI against DINO"). Trainings run in `--jobs` processes at once.
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import shlex
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
DATA = "digits"  # training and evaluation data, with per-pixel classes for the dense probe
CLEAR_MARGIN = 10.0  # points of k-NN cls over the random network that count as learning (issue 24)


def train_and_evaluate(objective: str, seed: int, flags: list, workdir: str, threads: int) -> dict:
    """Train one objective with one seed (the demo preset on DATA, then `flags`) in `threads` threads;
    -> dict(metrics, train_seconds, train_cpu_seconds, last_epoch (its log record), args)."""
    torch.set_num_threads(threads)
    output_dir = os.path.join(workdir, f"{objective}_seed{seed}")
    args = parse_args(["--preset", "demo", "--objective", objective, "--seed", str(seed), "--output_dir",
                       output_dir, "--embedded_data", DATA, "--final_eval", "false", *flags])
    start, cpu_start = time.time(), time.process_time()
    _, teacher = train_udi(args)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - cpu_start
    device = next(teacher.parameters()).device
    with open(os.path.join(output_dir, "log.txt")) as f:
        last_epoch = json.loads(f.readlines()[-1])
    return dict(metrics=evaluate(teacher.backbone, args.global_crop_size, device, DATA), train_seconds=train_seconds,
                train_cpu_seconds=train_cpu_seconds, last_epoch=last_epoch, args=vars(args))


def evaluate_random(seed: int, args_dict: dict, threads: int) -> dict:
    """A randomly initialised UDI backbone (seed) of the same architecture."""
    torch.set_num_threads(threads)
    utils.fix_random_seeds(seed)
    args = argparse.Namespace(**args_dict)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dict(metrics=evaluate(build_model(args).backbone.to(device), args.global_crop_size, device, DATA))


def mean_std(values: list) -> dict:
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict) -> dict:
    """runs: name -> [per-seed run] -> name -> metric -> dict(mean, std) over the seeds."""
    return {name: {metric: mean_std([run["metrics"][metric] for run in seeds])
                   for metric in METRICS if all(metric in run["metrics"] for run in seeds)}
            for name, seeds in runs.items()}


def compare(summary: dict) -> dict:
    """Per metric: each objective's margin over the random network, and UDI − DINO with its spread, the standard
    deviation of the difference of two single-seed results (sqrt(std_udi² + std_dino²)): the difference `exceeds`
    it or not. -> dict(margins={objective: {metric: points}}, udi_minus_dino={metric: dict(diff, spread, exceeds)},
    learns={objective: k-NN cls margin >= CLEAR_MARGIN})."""
    random = summary["random init"]
    margins = {o: {m: v["mean"] - random[m]["mean"] for m, v in summary[o].items() if m in random}
               for o in OBJECTIVES}
    differences = {}
    for metric in set(summary["udi"]) & set(summary["dino"]):
        udi, dino = summary["udi"][metric], summary["dino"][metric]
        diff, spread = udi["mean"] - dino["mean"], math.hypot(udi["std"], dino["std"])
        differences[metric] = dict(diff=diff, spread=spread, exceeds=abs(diff) > spread)
    return dict(margins=margins, udi_minus_dino=differences,
                learns={o: margins[o]["knn_cls"] >= CLEAR_MARGIN for o in OBJECTIVES})


def table(summary: dict, comparison: dict) -> str:
    """A markdown table: mean ± std per method, the margins over the random network, UDI − DINO (* where it
    exceeds the seed-to-seed spread)."""
    names = list(summary)
    lines = ["| metric (%) | " + " | ".join(names) + " | DINO margin | UDI margin | UDI − DINO (spread) |",
             "| --- " * (len(names) + 4) + "|"]
    for metric in METRICS:
        cells = [f"{summary[n][metric]['mean']:.1f} ± {summary[n][metric]['std']:.1f}" if metric in summary[n]
                 else "—" for n in names]
        cells += [f"{comparison['margins'][o][metric]:+.1f}" if metric in comparison["margins"][o] else "—"
                  for o in ("dino", "udi")]
        d = comparison["udi_minus_dino"].get(metric)
        cells.append(f"{d['diff']:+.1f} ({d['spread']:.1f}){' *' if d['exceeds'] else ''}" if d else "—")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(summary: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(summary)
    for k, (name, metrics) in enumerate(summary.items()):
        present = [metric for metric in METRICS if metric in metrics]
        xs = [METRICS.index(metric) + k * width for metric in present]
        ax.bar(xs, [metrics[m]["mean"] for m in present], width, yerr=[metrics[m]["std"] for m in present],
               capsize=3, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], METRICS, rotation=15)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(seeds: list, flags: list, jobs: int) -> dict:
    """Every (objective, seed) training and every random network's evaluation, `jobs` at a time -> runs: name ->
    [per-seed run], names in table order."""
    threads = max(1, torch.get_num_threads() // jobs)
    with tempfile.TemporaryDirectory() as workdir, \
            concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(objective, seed): pool.submit(train_and_evaluate, objective, seed, flags, workdir, threads)
                   for seed in seeds for objective in OBJECTIVES}
        runs = {objective: [futures[objective, seed].result() for seed in seeds] for objective in OBJECTIVES}
        randoms = [pool.submit(evaluate_random, seed + 1000, run["args"], threads)
                   for seed, run in zip(seeds, runs["udi"])]
        runs["random init"] = [future.result() for future in randoms]
    return {name: runs[name] for name in ("random init", "dino", "udi")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--seeds", default=[0, 1, 2], type=SEED, nargs="+", help="training seeds (at least 2 for a spread)")
    p.add_argument("--train_flags", default="", help="udi.train flags on top of the demo preset, in one string "
                   "(e.g. \"--epochs 32\"): both objectives get them")
    p.add_argument("--record", action="store_true", help="write into benchmarks/results/ (tracked)")
    p.add_argument("--output_dir", default=os.path.join(HERE, "out"), help="where results go without --record")
    p.add_argument("--jobs", default=2 if not torch.cuda.is_available() else 1, type=int_in(1, 64),
                   help="trainings run at the same time, in processes of torch.get_num_threads() // jobs threads "
                        "each (2 on a CPU machine, 1 with a GPU)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    flags = shlex.split(args.train_flags)
    parse_args(["--preset", "demo", *flags])  # a bad flag fails here, before any training
    out_dir = os.path.join(HERE, "results") if args.record else args.output_dir
    os.makedirs(out_dir, exist_ok=True)
    start, load_before = time.time(), os.getloadavg()[0]
    runs = run_all(args.seeds, flags, args.jobs)
    summary = summarise(runs)
    comparison = compare(summary)
    steps = runs["udi"][0]["args"]
    title = (f"embedded digits, {len(args.seeds)} seeds, demo preset{' ' + args.train_flags if flags else ''}: "
             f"{steps['epochs']} epochs x {steps['embedded_images'] // steps['batch_size_per_gpu']} steps of "
             f"{steps['batch_size_per_gpu']} images, ViT {steps['embed_dim']}-d x {steps['depth']}, "
             f"patch {steps['patch_size']}")
    record = dict(benchmark="objectives", data=DATA, train_flags=flags, seeds=args.seeds, title=title,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                  device=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), jobs=args.jobs, wall_seconds=time.time() - start,
                  load_average_1min_before=round(load_before, 2), load_average_1min_after=round(os.getloadavg()[0], 2),
                  summary=summary, comparison=comparison,
                  runs={n: [{k: v for k, v in r.items() if k != "args"} for r in rs] for n, rs in runs.items()},
                  train_args={k: v for k, v in steps.items() if k not in ("seed", "output_dir", "objective")})
    path = os.path.join(out_dir, "objectives_cpu")
    with open(path + ".json", "w") as f:
        json.dump(record, f, indent=1)
    chart(summary, path + ".png", title)
    print(f"wrote {path}.json, {path}.png ({record['wall_seconds']:.0f} s)\n{title}\n{table(summary, comparison)}")
    for objective, learns in comparison["learns"].items():
        if not learns:
            print(f"{objective}: k-NN cls {comparison['margins'][objective]['knn_cls']:+.1f} points over the random "
                  f"network, short of the {CLEAR_MARGIN:.0f} that count as learning")
    return record


if __name__ == "__main__":
    main()
