"""One UDI training step, per phase (issue 5 §5): this package, an eager step with the reference's structure, and
the timm backbone alone on the same crops (the floor: everything UDI adds is overhead on top of it).

    python -m benchmarks.train_step [--quick] [--out DIR | --record]
        [--providers udi_kernels udi_kernels_logits reference_structure backbone] [--compile]

- udi_kernels: udi.train's step, the same udi.step.UDIStep object (its optimizer part: AdamW's step and the
  step's teacher EMA, without gradient clipping): GPU sampling, teacher backbone once, SRS attention on the sampled queries,
  teacher targets formed in the bottleneck, the fused UDILoss with the head's last layer fused in (no [rows, K]
  logits: linear_distill_cross_entropy).
- udi_kernels_logits: the same step with --fuse_last_layer false: the head forms the [rows, K] logits, the loss
  takes them (distill_cross_entropy).
- reference_structure: dense [S, N] maps (built on the CPU beforehand, as the reference's data loader does),
  the teacher backbone run twice, teacher local-sample logits materialised with an unused fp32 softmax, the
  student's local SRS attention run and thrown away, the eager loss of benchmarks/distill_cross_entropy.py.
- backbone: the student's timm ViT alone on every crop, forward + backward of a scalar + AdamW.

--compile instead compares the udi_kernels step eager and under udi.train's --compile (udi.compiled.compile_step)
at both granularities, "model" (what --compile runs) and "blocks": the whole step's median, eager and compiled
interleaved over common.ROUNDS rounds, and each compiled variant's first step (its compile time) in a fresh process
with inductor's caches off (a cold compile); written as train_step_compile_<cpu|gpu>.json.

GPU: ViT-S/16, B=128, L=10, K=65536, bf16 autocast; --quick stops there, otherwise a sweep over B follows.
Phases (teacher fwd, student fwd, loss fwd, backward, optimizer incl. the teacher EMA) are CUDA-event medians
over the iterations; `step` is the median whole step (common.median_ms); peak memory is the maximum allocated
during the timed steps (parameters and optimizer states included). Without a GPU: a tiny CPU configuration that
only shows the code runs; GPU numbers need a GPU.
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import statistics
import time

import torch

from benchmarks import common
from udi import utils
from udi.cli import parse_args
from udi.compiled import compile_step
from udi.step import UDIStep, sample_pairs
from udi_kernels.layout import (TeacherTaps, UDIStudent, UDITeacher, crop_major, split_teacher_samples, stack_crops,
                                student_taps, teacher_rows_by_pair, teacher_taps)
from udi_kernels.taps import taps_to_dense
from udi_kernels.testing.losses import udi_loss_eager
from udi_kernels.testing.references import dense_srs_block

PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")
PROVIDERS = ("udi_kernels", "udi_kernels_logits", "reference_structure", "backbone")
COMPILED = {"udi_kernels": None, "compiled_model": "model", "compiled_blocks": "blocks"}  # --compile: granularity


class PhaseTimer:
    """Marks between phases: CUDA events on a GPU, wall-clock without one."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def config(device):
    preset = ["--preset", "reference"] if device.type == "cuda" else [
        "--preset", "demo", "--embedded_data", "images", "--local_crops_number", "2"]
    return parse_args(preset + ["--drop_path_rate", "0"])


def make_batch(cfg, B, device):
    """The data loader's batch (udi.data.collate_multicrop): 2 + L random views [B, 3, s, s] (no zeros) and random
    overlapping boxes [B, 2 + L, 4], drawn on the CPU with a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    L, Sg, Sl = cfg.local_crops_number, cfg.global_crop_size, cfg.local_crop_size
    views = [torch.randn(B, 3, Sg, Sg, generator=gen) for _ in range(2)]
    views += [torch.randn(B, 3, Sl, Sl, generator=gen) for _ in range(L)]
    corners = torch.rand(B, 2 + L, 2, generator=gen) * 0.4
    boxes = torch.cat([corners, corners + 0.3 + 0.3 * torch.rand(B, 2 + L, 2, generator=gen)], -1)
    return [v.to(device) for v in views], boxes.to(device)


class Step:
    """One provider's models, optimizer and batch; __call__(timer) runs one step, marking after each phase."""

    def __init__(self, provider, cfg, B, device):
        utils.fix_random_seeds(0)
        if provider == "udi_kernels_logits":
            cfg = argparse.Namespace(**{**vars(cfg), "fuse_last_layer": False})
        self.provider, self.cfg, self.B, self.device = provider, cfg, B, device
        self.step = UDIStep(cfg, device)
        if COMPILED.get(provider):
            compile_step(self.step, COMPILED[provider])
        self.student, self.teacher = self.step.student, self.step.teacher
        params = self.student.backbone.parameters() if provider == "backbone" else self.student.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        self.centers = torch.zeros(3, cfg.out_dim, device=device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else None
        self.views, self.boxes = make_batch(cfg, B, device)
        self.global_crops, self.local_crops = stack_crops(self.views)
        if provider == "reference_structure":
            self.dense_maps = self._dense_maps()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def __call__(self, timer: PhaseTimer):
        timer.mark()
        with self.autocast():
            loss = getattr(self, self.provider)(timer)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        timer.mark()
        self.optimizer.step()
        if self.provider != "backbone":
            self.step.update_teacher(0.996)
        timer.mark()

    def udi_kernels(self, timer):
        loss, _ = self.step(self.views, self.boxes, 0, 1234, on_phase=timer.mark)
        timer.mark()
        return loss

    udi_kernels_logits = compiled_model = compiled_blocks = udi_kernels

    def _dense_maps(self):
        """The reference's dense maps [rows, S, N], built on the CPU (its data loader's work; not timed)."""
        cfg = self.cfg
        pairs = sample_pairs(self.boxes.cpu(), cfg, 1234)
        Ng, Nl = (cfg.global_crop_size // cfg.patch_size) ** 2, (cfg.local_crop_size // cfg.patch_size) ** 2
        teacher, student = teacher_taps(pairs), student_taps(pairs)
        local_src = crop_major(pairs.locals.src_index[:, :, 0])[..., None].long()
        maps = dict(teacher=taps_to_dense(teacher.index.long(), teacher.weight, Ng),
                    student=taps_to_dense(student.index.long(), student.weight, Ng),
                    student_local=taps_to_dense(local_src, torch.ones(local_src.shape), Nl))
        maps = {name: value.to(self.device) for name, value in maps.items()}
        maps["teacher_taps"] = TeacherTaps(*(t.to(self.device) for t in teacher))  # its masks order the rows
        return maps

    def reference_structure(self, timer):
        maps, teacher, student = self.dense_maps, self.teacher, self.student
        with torch.no_grad():
            cls_t = teacher.backbone(self.global_crops).cls
            patch_t = teacher_rows_by_pair(teacher.backbone(self.global_crops).patch)
            logits = teacher.head(dense_srs_block(teacher.srs, patch_t, maps["teacher"]))
            targets = UDITeacher(teacher.head(cls_t), *split_teacher_samples(logits, maps["teacher_taps"]))
            targets.local.float().softmax(-1)  # the reference's unused fp32 softmax
        timer.mark()
        g, l = student.backbone(self.global_crops), student.backbone(self.local_crops)
        dense_srs_block(student.srs, l.patch, maps["student_local"])  # computed and thrown away, as the reference does
        samples = dense_srs_block(student.srs, g.patch, maps["student"])
        cls = torch.cat([g.cls, l.cls])
        rows = student.head(torch.cat([cls, g.cls_plus, l.cls_plus, samples.flatten(0, 1)]))
        c, cp, p = rows.split([len(cls), len(cls), samples.shape[0] * samples.shape[1]])
        outputs = UDIStudent(c, cp, p.unflatten(0, samples.shape[:2]))
        timer.mark()
        loss, _ = udi_loss_eager(outputs, targets, self.centers, 0.04, dtype=torch.float32)
        update_centers_eagerly(self.centers, targets)
        timer.mark()
        return loss

    def backbone(self, timer):
        timer.mark()
        out = [self.student.backbone(self.global_crops), self.student.backbone(self.local_crops)]
        timer.mark()
        loss = sum(o.cls.float().square().mean() + o.patch.float().square().mean() for o in out)
        timer.mark()
        return loss


@torch.no_grad()
def update_centers_eagerly(centers, teacher: UDITeacher, momentum=0.9):
    """The reference's center updates on fp32 copies (cls, and patch over global and local samples; the cls+
    update, one mean over 2B(1 + L) rows, is left out)."""
    patch = torch.cat([teacher.patch[teacher.patch_mask], teacher.local[teacher.local_mask]]).float()
    means = torch.stack([teacher.cls.float().mean(0), patch.mean(0)])
    centers[[0, 2]] = centers[[0, 2]] * momentum + means * (1 - momentum)


def measure(provider, cfg, B, device, warmup, iters):
    step = Step(provider, cfg, B, device)
    for _ in range(warmup):
        step(PhaseTimer(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(iters):
        timer = PhaseTimer(device)
        step(timer)
        samples.append(timer.durations_ms())
    result = {name: statistics.median(s[k] for s in samples) for k, name in enumerate(PHASES)}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["step"] = common.median_ms(lambda: step(PhaseTimer(device)), device, quick=True, flush_l2=False)
    return result


def relative_to_backbone(rows):
    floor = {r["B"]: r for r in rows if r["provider"] == "backbone" and "step" in r}
    for r in rows:
        base = floor.get(r["B"])
        if base and "step" in r:
            r["x_backbone_time"] = r["step"] / base["step"]
            if base.get("peak_mib"):
                r["x_backbone_memory"] = r["peak_mib"] / base["peak_mib"]


def first_step_seconds(provider, cfg, B, device) -> dict:
    """The wall seconds of a fresh Step's first step (for a compiled provider: its compile) and of its second."""
    step = Step(provider, cfg, B, device)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        step(PhaseTimer(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"first_step_s": seconds[0], "second_step_s": seconds[1]}


def compare_compiled(args, cfg, B, device):
    """--compile: the eager step against both compiled granularities (module docstring)."""
    cfg.batch_size_per_gpu = B
    steps = {provider: Step(provider, cfg, B, device) for provider in COMPILED}
    timed = common.interleaved({p: (lambda s=s: s(PhaseTimer(device))) for p, s in steps.items()}, device,
                               quick=args.quick, flush_l2=False)
    rows = []
    for provider, granularity in COMPILED.items():
        row = {"provider": provider, "granularity": granularity or "eager", "B": B, "step": timed[provider]["ms"],
               "rounds_ms": timed[provider]["rounds_ms"]}
        if granularity:
            row.update(common.fresh_process_json("benchmarks.train_step", ["--first_step_of", provider])
                       if not args.quick else {})
        rows.append(row)
    eager = rows[0]["step"]
    for row in rows:
        row["x_eager"] = row["step"] / eager
    shape = {"arch": cfg.arch, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "patch_size": cfg.patch_size,
             "L": cfg.local_crops_number, "K": cfg.out_dim, "global_crop_size": cfg.global_crop_size,
             "local_crop_size": cfg.local_crop_size, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}
    path = common.write_json(args.out, "train_step_compile", device, {**shape, "rows": rows})
    print(f"wrote {path}")
    common.print_table(rows, [("provider", "provider", "{}"), ("B", "B", "{}"), ("step", "step ms", "{:.2f}"),
                              ("x_eager", "x eager", "{:.2f}"), ("first_step_s", "first step s", "{:.1f}"),
                              ("second_step_s", "second step s", "{:.3f}")])


def main():
    args = common.parse_args(__doc__.splitlines()[0], **{
        "--providers": dict(nargs="+", default=list(PROVIDERS), choices=PROVIDERS),
        "--compile": dict(action="store_true", help="eager against udi.train's --compile, both granularities"),
        "--first_step_of": dict(choices=[p for p, g in COMPILED.items() if g],
                                help="print the first and second step's seconds of this compiled provider as "
                                     "JSON (what --compile runs in a fresh process, inductor's caches off)")})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config(device)
    B = 128 if device.type == "cuda" else 8
    if args.first_step_of:
        cfg.batch_size_per_gpu = B
        with torch.compiler.config.patch(force_disable_caches=True):
            print(json.dumps(first_step_seconds(args.first_step_of, cfg, B, device)))
        return
    if args.compile:
        return compare_compiled(args, cfg, B, device)
    if device.type == "cuda":
        main_B, sizes, (warmup, iters) = 128, ([128] if args.quick else [32, 64, 128, 256]), \
            ((2, 5) if args.quick else (3, 10))
    else:
        main_B, sizes, (warmup, iters) = 8, [8], (1, 3)
    rows = []
    for B in sizes:
        cfg.batch_size_per_gpu = B
        for provider in args.providers:
            try:
                result = measure(provider, cfg, B, device, warmup, iters)
            except torch.OutOfMemoryError:
                result = {"error": "out of memory"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"provider": provider, "B": B, **result})
    relative_to_backbone(rows)
    shape = {"arch": cfg.arch, "patch_size": cfg.patch_size, "L": cfg.local_crops_number, "K": cfg.out_dim,
             "global_crop_size": cfg.global_crop_size, "local_crop_size": cfg.local_crop_size,
             "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}
    path = common.write_json(args.out, "train_step", device, {**shape, "rows": rows})
    chart_rows = [r for r in rows if r["B"] == main_B and "step" in r]
    if chart_rows:
        chart = common.bar_chart(path[:-len(".json")] + ".png", f"UDI step, {cfg.arch}, B={main_B}",
                                 list(PHASES) + ["step"], {r["provider"]: [r[k] for k in PHASES + ("step",)]
                                                           for r in chart_rows}, "ms (median)")
        print(f"chart {chart}")
    print(f"wrote {path}")
    if device.type != "cuda":
        print("CPU run of a tiny configuration: GPU numbers need a GPU.")
    common.print_table(rows, [("provider", "provider", "{}"), ("B", "B", "{}")]
                       + [(k, k, "{:.2f}") for k in PHASES + ("step",)]
                       + [("peak_mib", "peak MiB", "{:.0f}"), ("x_backbone_time", "x time", "{:.2f}"),
                          ("x_backbone_memory", "x mem", "{:.2f}"), ("error", "error", "{}")])


if __name__ == "__main__":
    main()
