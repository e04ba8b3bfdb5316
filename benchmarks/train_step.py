"""One UDI training step, per phase (issue 5 §5): this package's step, an eager step with the reference's structure
(dense [S, N] maps built on the CPU, teacher backbone run twice, teacher local-sample logits materialised with an
unused fp32 softmax, student local SRS run and thrown away) and the timm backbone alone on the same crops.

    python benchmarks/train_step.py [--quick] [--out benchmarks/results]

GPU: B=128, L=10, K=65536, ViT-S/16, bf16 autocast, plus a sweep over B. CPU: a tiny configuration (numbers only
show that the code runs; GPU numbers need a GPU).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udi import utils  # noqa: E402
from udi.model import StudentOutput, TeacherTargets, build_model, student_taps, teacher_taps  # noqa: E402
from udi.objective import UDIObjective  # noqa: E402
from udi.train import parse_args, sample_pairs  # noqa: E402
from udi_kernels.taps import taps_to_dense  # noqa: E402

PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")


class PhaseTimer:
    """CUDA events between phases on a GPU, wall-clock with no GPU."""

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


def config(args):
    preset = ["--preset", "reference"] if args.device.type == "cuda" else [
        "--preset", "demo", "--batch_size_per_gpu", "8", "--local_crops_number", "2"]
    return parse_args(preset + ["--output_dir", args.out])


def make_batch(cfg, B, device):
    """Random crops and random overlapping boxes (no zeros), generated on the CPU with a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    L, Sg, Sl = cfg.local_crops_number, cfg.global_crop_size, cfg.local_crop_size
    global_crops = torch.randn(2 * B, 3, Sg, Sg, generator=gen)
    local_crops = torch.randn(L * B, 3, Sl, Sl, generator=gen)
    corners = torch.rand(B, 2 + L, 2, generator=gen) * 0.4
    boxes = torch.cat([corners, corners + 0.3 + 0.3 * torch.rand(B, 2 + L, 2, generator=gen)], -1)
    return global_crops.to(device), local_crops.to(device), boxes.to(device)


def loss_backward_update(loss, outputs, targets, optimizer, timer):
    """Loss forward (fp32 inside), backward, AdamW step + center update; a timer mark after each phase."""
    value, _ = loss(outputs, targets, 0)
    timer.mark()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    timer.mark()
    optimizer.step()
    loss.update_center(targets)
    timer.mark()


def package_step(cfg, student, teacher, loss, optimizer, batch, timer, dtype):
    global_crops, local_crops, boxes = batch
    pairs = sample_pairs(boxes, cfg, 1234, 0, 1)
    with torch.autocast(global_crops.device.type, dtype=dtype, enabled=dtype is not None):
        timer.mark()
        targets = teacher.teacher_targets(global_crops, pairs)
        timer.mark()
        outputs = student(global_crops, local_crops, *student_taps(pairs))
        timer.mark()
    loss_backward_update(loss, outputs, targets, optimizer, timer)


def dense_srs(srs, x, dense):
    """The reference's MaskedAttention with a dense map [B, S, N]: every token projected, maps multiplied."""
    h = srs.norm1(x)
    B, N, C = h.shape
    H = srs.attn.num_heads
    q, k, v = srs.attn.qkv(h).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q = torch.einsum("bsn,bhnd->bhsd", dense.to(q.dtype), q)
    attn = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(-1)
    out = srs.attn.proj((attn @ v).transpose(1, 2).reshape(B, -1, C))
    return srs.attn.norm(out + dense.to(h.dtype) @ h)


def reference_structure_step(cfg, student, teacher, loss, optimizer, batch, timer, dtype):
    """Same math as package_step, reference structure (see the module docstring)."""
    global_crops, local_crops, boxes = batch
    pairs = sample_pairs(boxes.cpu(), cfg, 1234, 0, 1)
    B = boxes.shape[0]
    Ng, Nl = (cfg.global_crop_size // cfg.patch_size) ** 2, (cfg.local_crop_size // cfg.patch_size) ** 2
    device = global_crops.device
    t_index, t_weight, (mask_g, mask_l) = teacher_taps(pairs)
    teacher_map = taps_to_dense(t_index.long(), t_weight, Ng).to(device)
    s_index, s_weight = student_taps(pairs)
    student_map = taps_to_dense(s_index.long(), s_weight, Ng).to(device)
    local_src = pairs.locals.src_index[:, :, 0].transpose(0, 1).flatten(0, 1)[..., None].long()
    local_map = taps_to_dense(local_src, torch.ones(local_src.shape), Nl).to(device)
    mask_g, mask_l = mask_g.to(device), mask_l.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        timer.mark()
        with torch.no_grad():
            cls_t = teacher.backbone(global_crops).cls
            patch_t = teacher.backbone(global_crops).patch.unflatten(0, (2, B)).flip(0).flatten(0, 1)
            logits = teacher.head(dense_srs(teacher.srs, patch_t, teacher_map)).unflatten(0, (2, B))
            cls_logits = teacher.head(cls_t).unflatten(0, (2, B)).flip(0)
            Sg = mask_g.shape[-1]
            local_logits = logits[:, :, Sg:].unflatten(2, mask_l.shape[2:])
            local_logits.float().softmax(-1)  # the reference's unused fp32 softmax
            targets = blend_in_logits(cls_logits, logits[:, :, :Sg], mask_g, local_logits, mask_l)
        timer.mark()
        g, l = student.backbone(global_crops), student.backbone(local_crops)
        dense_srs(student.srs, l.patch, local_map)  # computed and thrown away, as the reference does
        samples = dense_srs(student.srs, g.patch, student_map)
        cls = torch.cat([g.cls, l.cls])
        rows = student.head(torch.cat([cls, g.cls_plus, l.cls_plus, samples.flatten(0, 1)]))
        c, cp, p = rows.split([len(cls), len(cls), samples.shape[0] * samples.shape[1]])
        outputs = StudentOutput(c.unflatten(0, (-1, B)), cp.unflatten(0, (-1, B)), p.reshape(2, B, Sg, -1))
        timer.mark()
    loss_backward_update(loss, outputs, targets, optimizer, timer)


def blend_in_logits(cls, patch, mask_g, local, mask_l, alpha=0.5):
    def blend(logits, mask, base):
        m = mask.to(logits.dtype)[..., None]
        return alpha * (logits * m).sum(-2) / (m.sum(-2) + 1e-5) + (1 - alpha) * base
    center_sum = (patch * mask_g[..., None]).flatten(0, -2).float().sum(0) + \
        (local * mask_l[..., None]).flatten(0, -2).float().sum(0)
    return TeacherTargets(cls, blend(patch, mask_g, cls), blend(local, mask_l, cls[:, :, None]).transpose(1, 2),
                          patch, mask_g, center_sum, (mask_g.sum() + mask_l.sum()).float())


def backbone_step(cfg, student, teacher, loss, optimizer, batch, timer, dtype):
    """timm backbone alone: forward of every crop (globals and locals), a scalar, backward, AdamW."""
    global_crops, local_crops, _ = batch
    with torch.autocast(global_crops.device.type, dtype=dtype, enabled=dtype is not None):
        timer.mark()
        timer.mark()
        out = [student.backbone(global_crops), student.backbone(local_crops)]
        timer.mark()
        value = sum(o.cls.float().square().mean() + o.patch.float().square().mean() for o in out)
        timer.mark()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    timer.mark()
    optimizer.step()
    timer.mark()


PROVIDERS = {"udi_kernels": package_step, "reference_structure": reference_structure_step, "backbone": backbone_step}


def measure(provider, cfg, B, device, warmup, iters):
    utils.fix_random_seeds(0)
    student, teacher = build_model(cfg).to(device), build_model(cfg).to(device)
    teacher.requires_grad_(False)
    loss = UDIObjective(cfg.out_dim, 0.04, 0.07, 1, 1).to(device)
    params = student.backbone.parameters() if provider == "backbone" else student.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    batch = make_batch(cfg, B, device)
    step = PROVIDERS[provider]
    cfg.batch_size_per_gpu = B
    samples = []
    for i in range(warmup + iters):
        if device.type == "cuda" and i == warmup:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        timer = PhaseTimer(device)
        step(cfg, student, teacher, loss, optimizer, batch, timer, dtype)
        if i >= warmup:
            samples.append(timer.durations_ms())
    result = {name: statistics.median(s[k] for s in samples) for k, name in enumerate(PHASES)}
    result["step"] = statistics.median(sum(s) for s in samples)
    if device.type == "cuda":
        result["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    args = p.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    cfg = config(args)
    sizes = ([cfg.batch_size_per_gpu] if args.quick else [32, 64, 128]) if args.device.type == "cuda" else [8]
    warmup, iters = (2, 5) if args.quick or args.device.type == "cpu" else (3, 10)
    rows = []
    for B in sizes:
        for provider in args.providers:
            try:
                result = measure(provider, cfg, B, args.device, warmup, iters)
            except torch.OutOfMemoryError:
                result = {"error": "out of memory"}
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"provider": provider, "B": B, **result})
    record = {"device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
              "L": cfg.local_crops_number, "K": cfg.out_dim, "arch": cfg.arch, "rows": rows,
              "note": "SRS attention and CE are the udi.seams stand-ins until udi_kernels.nn / losses land"}
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(rows, os.path.join(args.out, "train_step.png"))
    where = "GPU" if args.device.type == "cuda" else "CPU: GPU numbers need a GPU"
    print(f"device {record['device']}  L={record['L']} K={record['K']} ({where})")
    print(f"{'provider':>20} {'B':>4} " + " ".join(f"{k:>11}" for k in PHASES + ("step", "peak_extra_mib")))
    for r in rows:
        print(f"{r['provider']:>20} {r['B']:>4} " + " ".join(f"{r.get(k, float('nan')):>11.2f}"
                                                        for k in PHASES + ("step", "peak_extra_mib")))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['provider']}\nB={r['B']}" for r in rows if "step" in r]
    bottom = [0.0] * len(labels)
    for phase in PHASES:
        values = [r[phase] for r in rows if "step" in r]
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per step (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
