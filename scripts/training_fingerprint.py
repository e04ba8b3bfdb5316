"""The numbers of short deterministic training runs, to show that a change of structure changes none of them:

    UDI_KERNELS_BACKEND=reference python scripts/training_fingerprint.py OUT.json [--compare BEFORE.json]

Runs udi.train (a tiny ViT on 8 embedded pictures, 2 epochs, one process, fp32) for each objective, with the head's
last layer fused into the loss and without (and once with 2 data-loader workers), and writes every epoch's log record (floats as repr, exact) and the
SHA-256 of every tensor of the checkpoint's networks, loss state and optimizer state. With --compare, exits 1
listing what differs from BEFORE.json (written the same way from the code before the change)."""
import argparse
import hashlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from udi.cli import parse_args  # noqa: E402
from udi.train import train_udi  # noqa: E402

TINY = ["--preset", "demo", "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--patch_size", "8",
        "--global_crop_size", "32", "--local_crop_size", "16", "--global_window", "2", "--local_window", "1",
        "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
        "--batch_size_per_gpu", "4", "--embedded_data", "images", "--embedded_images", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1", "--final_eval", "false", "--precision", "fp32",
        "--drop_path_rate", "0.1"]
RUNS = {f"{objective}-fuse_{fuse}": ["--objective", objective, "--fuse_last_layer", fuse]
        for objective in ("udi", "dino") for fuse in ("true", "false")}
RUNS["udi-workers_2"] = ["--num_workers", "2", "--epochs", "3"]  # the views made in data-loader workers


def tensor_digests(state, prefix="") -> dict:
    """name -> sha256 of dtype, shape and bytes, for every tensor in a nest of dicts and lists."""
    if torch.is_tensor(state):
        data = state.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return {prefix: digest.hexdigest()}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensor_digests(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def fingerprint(flags: list) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        train_udi(parse_args(TINY + flags + ["--output_dir", output_dir]))
        checkpoint = torch.load(os.path.join(output_dir, "checkpoint.pth"), weights_only=False)
    loss_key = next(k for k in ("udi_loss", "dino_loss") if k in checkpoint)
    log = [{k: repr(v) for k, v in record.items()} for record in checkpoint["log"]]
    return dict(log=log, tensors=tensor_digests({k: checkpoint[k] for k in ("student", "teacher", "optimizer",
                                                                            loss_key)}))


def differences(before: dict, after: dict) -> list:
    lines = []
    for run in before.keys() | after.keys():
        if run not in before or run not in after:
            lines.append(f"{run}: only in {'after' if run in after else 'before'}")
            continue
        if before[run]["log"] != after[run]["log"]:
            lines.append(f"{run}: log {before[run]['log']} != {after[run]['log']}")
        a, b = before[run]["tensors"], after[run]["tensors"]
        lines += [f"{run}: tensor {name} differs" for name in sorted(a.keys() | b.keys()) if a.get(name) != b.get(name)]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where the fingerprint (JSON) goes")
    p.add_argument("--compare", help="a fingerprint of the code before the change")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {name: fingerprint(flags) for name, flags in RUNS.items()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            diff = differences(json.load(f), result)
        print("\n".join(diff) if diff else f"identical: {len(result)} runs, their logs and every tensor")
        raise SystemExit(1 if diff else 0)
    print(f"wrote {args.out}: {len(result)} runs")


if __name__ == "__main__":
    main()
