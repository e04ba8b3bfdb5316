"""udi.train's checkpoint file: what it holds, how it is written (atomically, with a checksum of its payload) and
how it is checked before a run trusts it (entries, checksum, finite weights).

A checkpoint is a dict saved by torch.save with the entries ENTRIES (+ the loss state, "udi_loss" or "dino_loss")
and CHECKSUM, the SHA-256 of every other entry (tensors by dtype, shape and bytes; containers and scalars by
value), so a file whose bytes changed after the write is refused by name. Checkpoints written before the checksum
existed (no CHECKSUM entry) still load: their entries and weights are checked, their bytes cannot be.
"""
import hashlib
import io
import numpy as np
import torch

from .errors import RunError
from .utils import load_checkpoint, replace_atomically

ENTRIES = ("student", "teacher", "optimizer", "epoch", "args", "scaler", "rng", "log")
LOSS_ENTRIES = ("udi_loss", "dino_loss")
CHECKSUM = "checksum"
WEIGHT_ENTRIES = ("student", "teacher")  # + the loss state: refused when not finite


def _feed(digest, obj):
    """Feed a canonical encoding of obj (tensors, arrays, containers, scalars) into the hash."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_checksum(state: dict) -> str:
    """"sha256:<hex>" of every entry of `state` but CHECKSUM."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM})
    return "sha256:" + digest.hexdigest()


def write_checkpoint(state: dict, path: str):
    """state + its CHECKSUM -> path, atomically (udi.utils.replace_atomically): a failed write (a full disk, a
    kill) leaves the previous file as it was; RunError saying "no space left" on a full disk."""
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM: payload_checksum(state)}, buffer)
    replace_atomically(path, buffer.getbuffer())


def _non_finite(entries: dict) -> list:
    return [f"{name}.{key}" for name, state in entries.items() for key, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


def check_entries(checkpoint, path: str, loss_key: str):
    """RunError naming `path` and the missing / unexpected entries unless `checkpoint` is a udi.train checkpoint of
    the objective whose loss state is `loss_key`."""
    if not isinstance(checkpoint, dict):
        raise RunError(f"{path} is not a udi.train checkpoint (a {type(checkpoint).__name__}, not a dict of entries); "
                       "move it away or choose another --output_dir")
    expected = set(ENTRIES) | {loss_key}
    missing = [key for key in (*ENTRIES, loss_key) if key not in checkpoint]
    unexpected = sorted(map(str, set(checkpoint) - expected - {CHECKSUM}))
    if missing or unexpected:
        other_loss = [k for k in LOSS_ENTRIES if k in checkpoint and k != loss_key]
        hint = f" (it holds {other_loss[0]}: written with another --objective)" if other_loss else ""
        raise RunError(f"{path} is not a checkpoint this run can resume: missing entries {missing or 'none'}, "
                       f"unexpected entries {unexpected or 'none'}{hint}; move it away or choose another --output_dir")
    if not isinstance(checkpoint["args"], dict):
        raise RunError(f"{path}: its 'args' is a {type(checkpoint['args']).__name__}, not the dict of the flags it was "
                       "written with; move it away or choose another --output_dir")
    if not isinstance(checkpoint["epoch"], int) or checkpoint["epoch"] < 0 or \
            not isinstance(checkpoint["log"], list) or len(checkpoint["log"]) != checkpoint["epoch"]:
        raise RunError(f"{path}: its 'epoch' ({checkpoint['epoch']!r}) and 'log' ({len(checkpoint['log'])} records) "
                       "do not describe the same epochs; move it away or choose another --output_dir")


def verify(checkpoint: dict, path: str, weight_entries=WEIGHT_ENTRIES) -> bool:
    """RunError naming `path` when its checksum does not match its payload or its weights are not finite;
    True when it had a checksum to verify, False for a checkpoint written before checksums."""
    saved = checkpoint.get(CHECKSUM)
    if saved is not None and saved != payload_checksum(checkpoint):
        raise RunError(f"{path} is corrupted: the checksum of its payload does not match the one written with it "
                       "(the file changed after it was written); restore it from a copy or choose another "
                       "--output_dir")
    bad = _non_finite({name: checkpoint[name] for name in weight_entries if isinstance(checkpoint.get(name), dict)})
    if bad:
        raise RunError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                       "restore it from a copy or choose another --output_dir")
    return saved is not None


def read_checkpoint(path: str, loss_key: str) -> dict:
    """The checkpoint at `path`, checked (check_entries, verify) before anything of it is used."""
    checkpoint = load_checkpoint(path)
    check_entries(checkpoint, path, loss_key)
    verify(checkpoint, path, WEIGHT_ENTRIES + (loss_key,))
    return checkpoint


def load_states(checkpoint: dict, path: str, **objects):
    """objects' load_state_dict from the checkpoint's entries of their names (an object may be a function taking
    the entry); RunError naming the entry that does not fit."""
    for name, obj in objects.items():
        try:
            getattr(obj, "load_state_dict", obj)(checkpoint[name])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            first = str(error).strip().splitlines()[0]
            raise RunError(f"cannot resume from {path}: its {name!r} does not fit this run ({first}); "
                           "choose another --output_dir") from error
