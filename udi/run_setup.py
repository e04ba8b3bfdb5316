"""What udi.train checks before a run writes anything, and the run's files: the output folder (a checkpoint to
resume, written with which flags; numbered checkpoints it would replace), the data against the batch, args.json,
and the lines that say what resumes, what changed and what will run.

Resuming: a checkpoint written with other data, model, crop or objective flags is refused, naming them (another
--output_dir, or --resume_anyway true, are the ways out); the flags of udi.cli.RESUMABLE (schedules, seed, batch,
precision, workers, output and evaluation; listed in --help) may change, and the run says which did. args.json
describes the run that started the checkpoint and is never rewritten on resume; a resumed run with changed flags
writes args.resumeNNNN.json.
"""
import dataclasses
import json
import os
from typing import Optional

from .checkpoint import read_checkpoint
from .cli import RESUMABLE, accumulation_text
from .distributed import check_same_on_every_rank
from .errors import RunError

PATH_FLAGS = ("data_path", "knn_data_path")


@dataclasses.dataclass
class Resume:
    """A checkpoint a run resumes: its path, entries, epochs done and the flags that changed since (flag ->
    (checkpoint's value, this run's))."""
    path: str
    checkpoint: dict
    epoch: int
    changed: dict


def _same(flag, saved, current) -> bool:
    if flag in PATH_FLAGS and saved is not None and current is not None:
        return os.path.abspath(saved) == os.path.abspath(current)
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return list(saved) == list(current)
    return saved == current


EMBEDDED_FLAGS = ("embedded_data", "embedded_images")  # unused by both sides when both trained on --data_path


def differences(saved: dict, args, defaults: dict) -> dict:
    """flag -> (checkpoint's value, this run's) for every flag of this run that differs; a flag the checkpoint
    does not record (it predates the flag) counts as its default."""
    saved = {k: saved.get(k, defaults.get(k)) for k in vars(args)}
    unused = EMBEDDED_FLAGS if saved["data_path"] is not None and args.data_path is not None else ()
    return {k: (saved[k], v) for k, v in vars(args).items() if k not in unused and not _same(k, saved[k], v)}


def flag_text(flag, value) -> str:
    return f"--{flag} {value_text(value)}"


def value_text(value) -> str:
    return "not set" if value is None else " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resumable(path: str, changed: dict, args):
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if refused and not args.resume_anyway:
        listed = ", ".join(f"{flag_text(k, new)} (checkpoint: {value_text(saved)})"
                           for k, (saved, new) in refused.items())
        raise RunError(f"{path} was written with other data, model or objective flags: {listed}. Start a new run "
                       f"with another --output_dir, or resume it anyway with --resume_anyway true")


def numbered_checkpoints(args, first_epoch: int) -> list:
    """The checkpointNNNN.pth files this run would write from epoch `first_epoch` on."""
    if not args.saveckp_freq:
        return []
    return [os.path.join(args.output_dir, f"checkpoint{e:04}.pth")
            for e in range(first_epoch + 1, args.epochs + 1) if e % args.saveckp_freq == 0]


def check_output(args, first_epoch: int):
    """RunError naming a file of output_dir that this run would replace without having written it."""
    existing = [p for p in numbered_checkpoints(args, first_epoch) if os.path.lexists(p)]  # a dangling link too
    if existing:
        run = f"resumed at epoch {first_epoch}" if first_epoch else "a new run"
        raise RunError(f"{existing[0]} exists and is not this run's ({run}); move it away or choose another "
                       "--output_dir")


def open_output(args, loss_key: str, world_size: int, defaults: dict) -> Optional[Resume]:
    """The checkpoint of output_dir this run resumes (checked: entries, checksum, weights, flags), or None for a
    new run; RunError naming the file when it cannot be resumed or a file would be replaced."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if not os.path.lexists(path):
        check_output(args, 0)
        return None
    if not os.path.exists(path):
        raise RunError(f"{path} is a link to {os.readlink(path)}, which does not exist (a disk not mounted?): make "
                       "it reachable to resume, or move the link away or choose another --output_dir for a new run")
    checkpoint = read_checkpoint(path, loss_key)
    changed = differences(checkpoint["args"], args, defaults)
    check_resumable(path, changed, args)
    if not isinstance(checkpoint["rng"], list) or len(checkpoint["rng"]) != world_size:
        raise RunError(f"{path} was written by {len(checkpoint['rng'])} process(es), this run has {world_size}: "
                       "resume it with as many, or choose another --output_dir")
    check_output(args, checkpoint["epoch"])
    return Resume(path, checkpoint, checkpoint["epoch"], changed)


def check_same_output(args, resume: Optional[Resume]):
    """RunError on every rank unless every rank found the same checkpoint.pth (or none) in output_dir: the ranks of
    a run on several nodes must see one --output_dir, on a file system they share (rank 0 alone writes it)."""
    seen = f"checkpoint.pth of {resume.epoch} epoch(s), {resume.checkpoint.get('checksum')}" if resume else \
        "no checkpoint.pth"
    check_same_on_every_rank(seen, f"files in --output_dir {args.output_dir}",
                             "give every node the same --output_dir, on a file system they share")


def resume_lines(resume: Resume, args) -> list:
    """What resumes, what changed since the checkpoint, what will run."""
    done = resume.epoch
    lines = [f"resuming {resume.path}: {done} epoch(s) done (epochs 0-{done - 1})"]
    shown = {k: v for k, v in resume.changed.items() if k not in ("resume_anyway", "output_dir")}
    if shown:
        lines.append("changed since the checkpoint: " + ", ".join(
            f"{flag_text(k, new)} (was {value_text(saved)})" for k, (saved, new) in shown.items())
            + ("; the schedules follow the new --epochs" if "epochs" in shown else ""))
    if done >= args.epochs:
        lines.append(f"nothing to train: the checkpoint already holds {done} epochs and --epochs is {args.epochs} "
                     "(a larger --epochs continues it)")
    else:
        lines.append(f"will run epochs {done}-{args.epochs - 1} ({args.epochs - done} of --epochs {args.epochs})")
    return lines


def args_file(args, resume: Optional[Resume]) -> Optional[str]:
    """Where this run's arguments go: args.json for a new run (or a resumed one without it), args.resumeNNNN.json
    for a resumed run with changed flags that trains, None when args.json already says it all."""
    main = os.path.join(args.output_dir, "args.json")
    if resume is None or not os.path.exists(main):
        return main
    if resume.epoch < args.epochs and any(k not in ("resume_anyway", "output_dir") for k in resume.changed):
        return os.path.join(args.output_dir, f"args.resume{resume.epoch:04}.json")
    return None


def write_args(args, resume: Optional[Resume]) -> Optional[str]:
    """Create output_dir and write args_file; returns its path (None when nothing was written). A new run keeps an
    args.json it finds (without a checkpoint: not necessarily this run's) as args.json.old, as log.txt."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = args_file(args, resume)
    if resume is None and os.path.isfile(path):
        os.replace(path, path + ".old")
        print(f"{path} had no checkpoint.pth: kept as {path}.old")
    if path is not None:
        with open(path, "w") as f:
            json.dump(vars(args), f, indent=1)
    return path


def check_batches(images: int, args, world_size: int, data: str):
    """RunError unless every rank sees as many images and the data give a full optimizer step (batch x processes
    x accum_iter), naming the flags."""
    check_same_on_every_rank(images, f"numbers of images in {data}", "give every node the same data")
    if images < args.batch_size_per_gpu * world_size * args.accum_iter:
        raise RunError(f"{data} has {images} images: no full batch of --batch_size_per_gpu {args.batch_size_per_gpu}"
                       f" x {world_size} process(es){accumulation_text(args)}; a smaller --batch_size_per_gpu"
                       f"{' or --accum_iter' if args.accum_iter > 1 else ''} or more images")


def interrupted_lines(args, epochs_done: int, argv) -> list:
    from .cli import resume_command
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if not epochs_done:
        return [f"interrupted in epoch 0: no checkpoint yet ({path} is written after each epoch)"]
    return [f"interrupted: {path} holds epochs 0-{epochs_done - 1} ({epochs_done} of {args.epochs}); the epoch that "
            "was running is lost", f"resume with: {resume_command(args, argv)}"]
