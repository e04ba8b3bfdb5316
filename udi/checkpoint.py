"""udi.train's checkpoint file: what it holds, how it is written (atomically, with a checksum of its payload) and
how it is checked before a run trusts it (entries, checksum, finite weights).

A checkpoint is a dict saved by torch.save with the entries ENTRIES (+ the loss state, "udi_loss" or "dino_loss")
and CHECKSUM, the SHA-256 of every other entry (tensors by dtype, shape and bytes; containers and scalars by
value), so a file whose bytes changed after the write is refused by name. Checkpoints written before the checksum
existed (no CHECKSUM entry) still load: their entries and weights are checked, their bytes cannot be.
"""
import hashlib
import io
from typing import Optional

import numpy as np
import torch

from .errors import RunError
from .utils import load_checkpoint, replace_atomically

ENTRIES = ("student", "teacher", "optimizer", "epoch", "args", "scaler", "rng", "log")
LOSS_ENTRIES = ("udi_loss", "dino_loss")
CHECKSUM = "checksum"
WEIGHT_ENTRIES = ("student", "teacher")  # + the loss state and the optimizer's moments on resume: finite


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


def _non_finite(obj, name: str) -> list:
    """The dotted names of the floating tensors inside obj (nested dicts, lists) that hold NaN or inf."""
    if torch.is_tensor(obj):
        return [name] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for key, value in items for bad in _non_finite(value, f"{name}.{key}")]


RESUME_WAY_OUT = "move it away or choose another --output_dir"
READ_WAY_OUT = "give a checkpoint.pth that udi.train wrote"


def _entry_kinds(checkpoint: dict, path: str, way_out: str):
    """RunError naming the first present entry of the wrong kind: args a dict of flags, the networks' and the loss
    state dicts of tensors, epoch an int >= 0 that counts the log's records."""
    if "args" in checkpoint and not isinstance(checkpoint["args"], dict):
        raise RunError(f"{path}: its 'args' is a {type(checkpoint['args']).__name__}, not the dict of the flags it was "
                       f"written with; {way_out}")
    for name, kind in (("optimizer", dict), ("scaler", dict), ("rng", list)):
        if name in checkpoint and not isinstance(checkpoint[name], kind):
            found = type(checkpoint[name]).__name__
            raise RunError(f"{path}: its {name!r} should be a {kind.__name__}, found {found}; {way_out}")
    for name in (*WEIGHT_ENTRIES, *LOSS_ENTRIES):
        state = checkpoint.get(name, {})
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            kind = type(state).__name__ if not isinstance(state, dict) else "dict holding other values than tensors"
            raise RunError(f"{path}: its {name!r} is a {kind}, not a state dict of tensors; {way_out}")
    if "epoch" in checkpoint or "log" in checkpoint:
        epoch, log = checkpoint.get("epoch"), checkpoint.get("log")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0 or not isinstance(log, list) or \
                len(log) != epoch or not all(isinstance(record, dict) for record in log):
            records = f"{len(log)} records" if isinstance(log, list) else type(log).__name__
            raise RunError(f"{path}: its 'epoch' ({epoch!r}) and 'log' ({records}) do not describe the same epochs; "
                           f"{way_out}")


def check_entries(checkpoint, path: str, loss_key: Optional[str] = None, required=ENTRIES):
    """RunError naming `path` and the missing / unexpected entries, or an entry of the wrong kind, unless
    `checkpoint` is a dict of udi.train's entries. loss_key given (a run resuming it): every entry of ENTRIES and
    that loss state, nothing else; None (a reader of some entries, the evaluations): the entries of `required`, any
    others of udi.train's."""
    way_out = RESUME_WAY_OUT if loss_key else READ_WAY_OUT
    if not isinstance(checkpoint, dict):
        raise RunError(f"{path} is not a udi.train checkpoint: it lacks the dict of entries (found a "
                       f"{type(checkpoint).__name__}); {way_out}")
    required = (*ENTRIES, loss_key) if loss_key else tuple(required)
    expected = set(required) | ({CHECKSUM} if loss_key else {CHECKSUM, *ENTRIES, *LOSS_ENTRIES})
    missing = [key for key in required if key not in checkpoint]
    unexpected = sorted(map(str, set(checkpoint) - expected))
    if missing and not loss_key:
        raise RunError(f"{path} is not a udi.train checkpoint: it lacks {missing} (found "
                       f"{sorted(map(str, checkpoint))}); {way_out}")
    if missing or unexpected:
        other_loss = [k for k in LOSS_ENTRIES if k in checkpoint and k != loss_key] if loss_key else []
        hint = f" (it holds {other_loss[0]}: written with another --objective)" if other_loss else ""
        what = "a checkpoint this run can resume" if loss_key else "a udi.train checkpoint"
        raise RunError(f"{path} is not {what}: missing entries {missing or 'none'}, unexpected entries "
                       f"{unexpected or 'none'}{hint}; {way_out}")
    _entry_kinds(checkpoint, path, way_out)


def verify(checkpoint: dict, path: str, weight_entries=WEIGHT_ENTRIES, way_out: str = RESUME_WAY_OUT) -> bool:
    """RunError naming `path` when its checksum does not match its payload or its weights are not finite;
    True when it had a checksum to verify, False for a checkpoint written before checksums."""
    saved = checkpoint.get(CHECKSUM)
    if saved is not None and saved != payload_checksum(checkpoint):
        raise RunError(f"{path} is corrupted: the checksum of its payload does not match the one written with it "
                       f"(the file changed after it was written); restore it from a copy, or {way_out}")
    bad = [bad for name in weight_entries if name in checkpoint for bad in _non_finite(checkpoint[name], name)]
    if bad:
        raise RunError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                       f"restore it from a copy, or {way_out}")
    return saved is not None


def read_checkpoint(path: str, loss_key: Optional[str] = None, entries=ENTRIES) -> dict:
    """The checkpoint at `path`, checked before anything of it is used, by every reader (udi.train resuming it with
    `loss_key`, the evaluations and udi.visualize reading `entries`): it loads, holds udi.train's entries of the
    right kinds (check_entries), its checksum matches and the weights it holds are finite (verify). RunError naming
    the file and what is wrong otherwise."""
    checkpoint = load_checkpoint(path)
    check_entries(checkpoint, path, loss_key, entries)
    if loss_key:
        weights = WEIGHT_ENTRIES + (loss_key, "optimizer")
    else:
        weights = tuple(e for e in entries if e not in ("args", "epoch", "log"))
    verify(checkpoint, path, weights, RESUME_WAY_OUT if loss_key else READ_WAY_OUT)
    return checkpoint


def load_states(checkpoint: dict, path: str, *, resuming: bool = True, **objects):
    """objects' load_state_dict from the checkpoint's entries of their names (an object may be a function taking
    the entry); RunError naming the entry that does not fit (resuming: a run resumes it; else a reader)."""
    for name, obj in objects.items():
        try:
            getattr(obj, "load_state_dict", obj)(checkpoint[name])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            first = str(error).strip().splitlines()[0]
            if resuming:
                raise RunError(f"cannot resume from {path}: its {name!r} does not fit this run ({first}); "
                               "choose another --output_dir") from error
            raise RunError(f"cannot read {path}: its {name!r} does not fit the network its 'args' describe "
                           f"({first}); {READ_WAY_OUT}") from error
