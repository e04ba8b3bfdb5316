"""Shared benchmark plumbing: timers, memory, result files, tables and charts."""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch


def parse_args(description, **extra):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for the JSON and PNG results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)
    return parser.parse_args()


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def median_ms_cuda(fn, warmup=10, rep=50):
    """Median of per-call CUDA-event times, L2 flushed between calls (triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def median_ms_cpu(fn, warmup=2, rep=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms(fn, device, **kwargs):
    return median_ms_cuda(fn, **kwargs) if device.type == "cuda" else median_ms_cpu(fn, **kwargs)


def peak_extra_bytes(fn, device):
    """Peak memory one call allocates beyond what was allocated before it (CUDA only; else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def write_json(out_dir, name, device, payload):
    os.makedirs(out_dir, exist_ok=True)
    record = {
        "benchmark": name,
        "device": device_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        **payload,
    }
    kind = "gpu" if device.type == "cuda" else "cpu"
    path = os.path.join(out_dir, f"{name}_{kind}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def bar_chart(path, title, labels, series, ylabel):
    """series: {name: [value per label]} -> grouped bars, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(series) / 2), 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
