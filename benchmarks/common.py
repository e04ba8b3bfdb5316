"""Shared benchmark plumbing: device choice, timers, memory, copy ceiling, result files, tables and charts.

Timings that hold on a shared machine: `interleaved` times the implementations of a comparison in turn over ROUNDS
rounds and takes medians (load that drifts during a run then weighs on all of them alike); every result file records
the 1-minute load average before and after the run and the CPU cores other processes kept busy meanwhile
(`machine_load`), and `--record` refuses to write benchmarks/results/ when the machine was loaded (above half its
cores): such a run goes to benchmarks/out/, marked `"loaded": true`.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from udi.flags import HelpFormatter
from udi_kernels.backends import BACKENDS


RECORDED_DIR = os.path.join(os.path.dirname(__file__), "results")  # tracked: runs recorded with --record
SCRATCH_DIR = os.path.join(os.path.dirname(__file__), "out")  # ignored by git
ROUNDS = 3  # interleaved rounds per comparison


def _cpu_seconds():
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process and its ended children), or
    None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]  # children: a
    # benchmark's fresh processes (fresh_process_json), once they have ended
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), \
        sum(usage.ru_utime + usage.ru_stime for usage in own)


_START = dict(load_average=os.getloadavg()[0], monotonic=time.monotonic(), cpu_seconds=_cpu_seconds())


def start_run():
    """Marks the start of the measured run (parse_args calls it; else the import of this module is the start)."""
    _START.update(load_average=os.getloadavg()[0], monotonic=time.monotonic(), cpu_seconds=_cpu_seconds())


def machine_load():
    """What else ran since start_run: 1-minute load averages before and after (the latter includes this run's own
    threads), the CPU cores other processes kept busy on average (None off Linux), and `loaded`: the load before
    or the other processes' cores above half the machine's cores."""
    cpus = os.cpu_count()
    before, after = _START["load_average"], os.getloadavg()[0]
    others = None
    now = _cpu_seconds()
    if now is not None and _START["cpu_seconds"] is not None:
        wall = max(time.monotonic() - _START["monotonic"], 1e-9)
        busy, own = (b - a for a, b in zip(_START["cpu_seconds"], now))
        others = round(max(busy - own, 0.0) / wall, 2)
    loaded = before > cpus / 2 or (others is not None and others > cpus / 2)
    return dict(cpus=cpus, load_average_1min_before=round(before, 2), load_average_1min_after=round(after, 2),
                other_processes_cores=others, loaded=loaded)


def backend_flag(help_text: str) -> dict:
    """The --backend flag of a benchmark: one of udi_kernels.backends.BACKENDS (argparse refuses others)."""
    return dict(default=None, choices=BACKENDS, help=f"{help_text} (default: auto)")


def parse_args(description, **extra):
    """The flags every benchmark takes (--out, --record, --quick) and `extra` ones, defaults shown in --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--out", help="directory for the JSON and PNG results (default: benchmarks/out/, ignored by "
                                      "git)")
    parser.add_argument("--record", action="store_true",
                        help="write the results into benchmarks/results/ (tracked by git), to record a run")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (GPU run < ~60 s)")
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if args.record and args.out:
        parser.error("--record writes into benchmarks/results/; give --out or --record, not both")
    args.out = RECORDED_DIR if args.record else (args.out or SCRATCH_DIR)
    start_run()
    return args


def pick_device():
    """The GPU when there is one, else the CPU (saying so: the benchmark then runs a small CPU version)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    print("No GPU here: running a small CPU version; GPU numbers need a GPU (scripts/gpu_check.sh).")
    return torch.device("cpu")


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def median_ms(fn, device, quick=False, flush_l2=True):
    """Median ms of single calls after a warm-up, as many calls as a time budget allows (at least 3).

    CUDA with flush_l2: triton.testing.do_bench (CUDA events, L2 flushed before each call: cold inputs, as
    after the rest of a training step). CUDA without: CUDA events around back-to-back calls, for fwd+bwd
    closures whose backward reads what the forward left in L2. CPU: perf_counter.
    """
    warmup_ms, rep_ms = (10, 40) if quick else (25, 200)
    if device.type == "cuda" and flush_l2:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / estimate_ms)):
        fn()
    calls = max(3, int(rep_ms / estimate_ms))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        sync()
        return statistics.median(begin.elapsed_time(end) for begin, end in events)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_of_call(fn) -> dict:
    """CPU memory of fn() in this process: peak RSS beyond the RSS before the call (`peak_extra_bytes`) and beyond
    the RSS after it (`working_bytes`: less what the call leaves alive, e.g. gradients). Linux only; call it in a
    fresh process (fresh_process_json) after one warm-up call of fn."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    fn()
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    return {"peak_extra_bytes": (peak - before) * 1024, "working_bytes": (peak - after) * 1024}


def step_memory_and_times(train_step, device, steps: int) -> dict:
    """A training step's memory, then its time: after the caller's warm-up call, one call measured for memory
    (peak_extra_bytes on CUDA, rss_of_call's peak RSS on the CPU: call it in a fresh process), then `steps` timed
    calls. Returns dict(peak_extra_bytes, [working_bytes,] step_ms=their median, rounds_ms=each)."""
    memory = ({"peak_extra_bytes": peak_extra_bytes(train_step, device)} if device.type == "cuda"
              else rss_of_call(train_step))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {**memory, "step_ms": statistics.median(times), "rounds_ms": times}


def fresh_process_json(module: str, args: list) -> dict:
    """Runs `python -m <module> <args>` from the repository root and returns the JSON of its last output line. Every
    allocation of 64 KiB or more is mapped and unmapped by itself in the child (MALLOC_MMAP_THRESHOLD_): what a
    warm-up freed is not reused unseen, so rss_of_call's peak counts every live byte of the measured call."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(fn, device, quick=False, flush_l2=True):
    """One warm-up call (compilation, autotuning), then dict(ms=median ms, peak_extra_bytes=... or None)."""
    fn()
    peak = peak_extra_bytes(fn, device)
    return dict(ms=median_ms(fn, device, quick, flush_l2), peak_extra_bytes=peak)


def interleaved(steps, device, quick=False, flush_l2=True, rounds=ROUNDS):
    """{name: fn} -> {name: dict(ms=median of the rounds' medians, rounds_ms=[one median_ms per round],
    peak_extra_bytes=...)}: one warm-up call each, then `rounds` rounds that time every fn in turn."""
    for fn in steps.values():
        fn()
    peaks = {name: peak_extra_bytes(fn, device) for name, fn in steps.items()}
    rounds_ms = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            rounds_ms[name].append(median_ms(fn, device, quick, flush_l2))
    return {name: dict(ms=statistics.median(times), rounds_ms=times, peak_extra_bytes=peaks[name])
            for name, times in rounds_ms.items()}


def copy_gb_per_s(device, quick=False):
    """The device's copy ceiling: bytes read + written per second by a 512 MiB copy (on the CPU with this process'
    torch threads; far beyond the caches)."""
    src = torch.ones(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), device, quick) / 1e6


def mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def write_json(out_dir, name, device, payload):
    """<out_dir>/<name>_<gpu|cpu>.json with the payload, the device, date, torch and machine_load(); a loaded run
    asked to go into benchmarks/results/ goes into benchmarks/out/ instead, saying so."""
    record = {
        "benchmark": name,
        "device": device_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        **payload,
        **machine_load(),
    }
    if record["loaded"] and os.path.abspath(out_dir) == os.path.abspath(RECORDED_DIR):
        print(f"not recording: the machine was loaded (load average {record['load_average_1min_before']} before, "
              f"other processes on {record['other_processes_cores']} of {record['cpus']} cores during the run); "
              f"writing into {SCRATCH_DIR} instead. Record in a quiet window.", file=sys.stderr)
        out_dir = SCRATCH_DIR
    os.makedirs(out_dir, exist_ok=True)
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


def bar_chart(path, title, labels, series, ylabel, lines=None):
    """series: {name: [value per label]} -> grouped bars, log scale. lines: optional second panel
    (title, xlabel, xs, {name: [value per x]}) -> one log-scale line per name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = max(6, 1.2 * len(labels) * len(series) / 2)
    fig, axes = plt.subplots(1, 2 if lines else 1, figsize=(width_in + (6 if lines else 0), 4), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    if lines:
        line_title, xlabel, xs, line_series = lines
        ax = axes[0, 1]
        for name, values in line_series.items():
            ax.plot(xs, [v if v is not None else float("nan") for v in values], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(line_title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fastest_backends(ms_by_class):
    """{shape class: {backend: ms}} -> {shape class: the backend with the least ms}: what a recorded run says
    `auto` should try first (udi_kernels/declarations.py; tests/test_declarations.py compares the two)."""
    return {shape_class: min(ms, key=ms.get) for shape_class, ms in ms_by_class.items()}


def finish(out_dir, name, device, payload, chart, rows, columns, caption=None):
    """JSON (write_json) and PNG (bar_chart(png path, *chart)) into out_dir, then `wrote <json>, <png>`, the caption
    and the table, last: scripts/gpu_check.sh prints everything after the `wrote` line."""
    path = write_json(out_dir, name, device, payload)
    chart_path = bar_chart(path[:-len(".json")] + ".png", *chart)
    print(f"wrote {path}, {chart_path}")
    if caption:
        print(caption)
    print_table(rows, columns)
