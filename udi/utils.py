"""Schedules, distributed setup, checkpoint loading and logging for udi.train (DINO's utilities, rewritten)."""
import errno
import json
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from .errors import RunError


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """One value per iteration: linear warm-up, then a cosine from base_value to final_value."""
    warmup_iters = min(warmup_epochs * niter_per_ep, epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def fix_random_seeds(seed: int, rank: int = 0):
    """Python's, numpy's and torch's generators seeded with (seed + rank) mod 2**32: rank r of a run draws its own
    stream (stochastic depth), as DINOv2's seed + rank."""
    seed = (seed + rank) % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, iteration: int) -> int:
    """The same 63-bit seed on every rank for a given (seed, iteration): sampling needs no saved RNG."""
    words = np.random.SeedSequence([seed, iteration]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1)


def clip_gradients(model, clip: float):
    """Per-parameter norm clipping, as DINO does: each gradient scaled by min(1, clip / (its L2 norm + 1e-6))."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))
        torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1).unbind())


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def param_groups(model):
    """DINO's groups: no weight decay on biases and norm parameters (1-d tensors); group 0 gets the wd schedule."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def replace_atomically(path: str, data: bytes):
    """data into path + ".tmp", flushed to disk, then os.replace: readers see the old file or the new one. A failed
    write (a full disk) removes the temporary file, keeps the old one and raises RunError saying so plainly."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise RunError(f"cannot write {path} ({len(data) / 2 ** 20:.1f} MiB): {reason}; {kept}. Free space (or "
                       "choose another --output_dir) and resume") from error


def _numpy_globals() -> list:
    """What a checkpoint's numpy RNG state unpickles from (numpy 2 names, else numpy 1's)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:
        from numpy.core.multiarray import _reconstruct, scalar
    return [np.ndarray, np.dtype, _reconstruct, scalar] + [type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"]


def load_checkpoint(path) -> dict:
    """torch.load on the CPU with weights_only=True (tensors, containers, numbers and the numpy arrays of the RNG
    state: a file that would run code when unpickled is refused before anything of it runs); a file that does not
    load (empty, truncated, not a checkpoint, other objects) raises RunError naming it."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RunError(f"cannot load the checkpoint {path} ({_load_failure(error)}); delete or replace it") from error


def _load_failure(error: Exception) -> str:
    if "Weights only load failed" in str(error):
        unsafe = re.search(r"GLOBAL (\S+)", str(error))
        return (f"it holds {unsafe.group(1) if unsafe else 'an object'}, neither tensor, number nor container: "
                "loading it could run code")
    return f"{type(error).__name__}: {error}"


def restore_log(output_dir, records: list):
    """Make log.txt hold exactly `records` (the checkpoint's, one JSON line each), replaced atomically: a run killed
    after its checkpoint and before its log.txt line resumes with a log that matches the checkpoint. A log.txt
    left without a checkpoint (records == []) is kept as log.txt.old."""
    if not (is_main_process() and output_dir):
        return
    path = os.path.join(output_dir, "log.txt")
    if not records and os.path.isfile(path) and os.path.getsize(path):
        os.replace(path, path + ".old")
        print(f"{path} had no checkpoint.pth: kept as {path}.old")
    replace_atomically(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def log_json(output_dir, record: dict):
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
