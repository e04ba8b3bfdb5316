"""How udi.train finds its processes, on one node or several: torchrun's environment, SLURM's when `srun` starts
the processes without torchrun, or one process; the process group; the check that the processes see the same
files.

    torchrun: RANK, WORLD_SIZE, LOCAL_RANK (LOCAL_WORLD_SIZE), MASTER_ADDR, MASTER_PORT -- set by torchrun
    srun:     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR if exported, else the first host of
              SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST (SLURM's compact form, node[01-04,07],
              expanded here without scontrol); MASTER_PORT if exported, else slurm_port(SLURM_JOB_ID)

RANK (torchrun) wins over SLURM_PROCID: torchrun started inside a SLURM job is torchrun. An environment that does not
describe a set of processes (RANK without WORLD_SIZE, a rank outside the world, a local rank without its GPU) is a
RunError naming the variables, before anything runs.
"""
import os
import re
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .errors import RunError

DEFAULT_MASTER_PORT = 29500  # torch.distributed's; under SLURM offset by the job id (slurm_port)
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class Launch(NamedTuple):
    """This process's place among the processes of a run: global rank, world size, rank on its node, the launcher
    ("torchrun", "srun" or "single") and where rank 0's store listens (None for one process)."""
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


SINGLE = Launch(0, 1, 0, "single")


def _integer(environ, name: str, low: int = 0, high: Optional[int] = None) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        raise RunError(f"the environment variable {name}={value!r} is not an integer") from None
    if number < low or (high is not None and number > high):
        bound = "inf" if high is None else high
        raise RunError(f"the environment variable {name}={number} is outside [{low}, {bound}]")
    return number


def _check_rank(rank: int, world_size: int, names: str):
    if rank >= world_size:
        raise RunError(f"{names}: rank {rank} is not below the world size {world_size}")


def expand_hostlist(text: str) -> list:
    """SLURM's compact host list -> the host names, in order: "node[01-03,07],gpu5" -> node01, node02, node03,
    node07, gpu5; a range keeps the width of its first number; several bracket groups in one name multiply
    ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2). ValueError naming the text when it is not of that form."""
    name_pattern = r"(?:[^,\[\]]|\[[^\[\]]+\])+"  # characters and [ranges], at least one
    if not re.fullmatch(f"{name_pattern}(?:,{name_pattern})*", text):
        raise ValueError(f"{text!r} is not a SLURM host list (name, name[01-04,07], separated by commas)")
    hosts = []
    for name in re.findall(name_pattern, text):
        parts = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
        names = [""]
        for i, part in enumerate(parts):
            names = [n + choice for n in names for choice in (_expand_ranges(part, text) if i % 2 else [part])]
        hosts += names
    return hosts


def _expand_ranges(ranges: str, text: str) -> list:
    """"01-03,07" -> ["01", "02", "03", "07"]."""
    values = []
    for piece in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"{text!r}: [{ranges}] is not a list of numbers and ranges LOW-HIGH")
        low, high = match[1], match[2] or match[1]
        values += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return values


def slurm_port(environ) -> int:
    """MASTER_PORT under srun: the exported one, else DEFAULT_MASTER_PORT + SLURM_JOB_ID % 1000 (two jobs whose
    rank 0 share a node then rarely share a port)."""
    if "MASTER_PORT" in environ:
        return _integer(environ, "MASTER_PORT", 1, 65535)
    job = _integer(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
    return DEFAULT_MASTER_PORT + job % 1000


def _slurm_master_addr(environ) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    for name in SLURM_NODELISTS:
        if environ.get(name):
            try:
                return expand_hostlist(environ[name])[0]
            except ValueError as error:
                raise RunError(f"the environment variable {name}: {error}; export MASTER_ADDR (the host of rank 0)") \
                    from None
    raise RunError(f"SLURM_PROCID is set but none of {', '.join(SLURM_NODELISTS)} nor MASTER_ADDR: export "
                   "MASTER_ADDR (the host of rank 0)")


def _from_torchrun(environ) -> Launch:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    if missing:
        present = "RANK" if "RANK" in environ else "WORLD_SIZE"
        raise RunError(f"{present} is set but {missing[0]} is not: torchrun sets both (unset {present} to run one "
                       "process)")
    rank, world_size = _integer(environ, "RANK"), _integer(environ, "WORLD_SIZE", 1)
    _check_rank(rank, world_size, "RANK and WORLD_SIZE")
    local_rank = _integer(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    if "LOCAL_WORLD_SIZE" in environ:
        _check_rank(local_rank, _integer(environ, "LOCAL_WORLD_SIZE", 1), "LOCAL_RANK and LOCAL_WORLD_SIZE")
    if world_size == 1:
        return Launch(rank, 1, local_rank, "torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise RunError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: torchrun sets them all")
    return Launch(rank, world_size, local_rank, "torchrun", environ["MASTER_ADDR"],
                  _integer(environ, "MASTER_PORT", 1, 65535))


def _from_srun(environ) -> Launch:
    missing = [name for name in ("SLURM_NTASKS", "SLURM_LOCALID") if name not in environ]
    if missing:
        raise RunError(f"SLURM_PROCID is set but {' and '.join(missing)} not: start the processes with srun (one "
                       "task per GPU) or torchrun")
    rank, world_size = _integer(environ, "SLURM_PROCID"), _integer(environ, "SLURM_NTASKS", 1)
    _check_rank(rank, world_size, "SLURM_PROCID and SLURM_NTASKS")
    if world_size == 1:
        return SINGLE
    return Launch(rank, world_size, _integer(environ, "SLURM_LOCALID"), "srun", _slurm_master_addr(environ),
                  slurm_port(environ))


def launch_from_env(environ=None) -> Launch:
    """This process's Launch from `environ` (default os.environ), as the module docstring says; SINGLE without
    torchrun's or SLURM's variables. RunError naming the variables when they are inconsistent."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ:
        return _from_srun(environ)
    return SINGLE


def cuda_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a process with `local_rank`: device local_rank, or device 0 when the process sees one
    device (srun --gpus-per-task=1 binds one GPU per task). RunError when there is no such device."""
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise RunError(f"local rank {local_rank} has no CUDA device: this node shows {device_count}; start at most "
                   f"{device_count} processes per node (--nproc-per-node, --ntasks-per-node)")


def init_distributed(backend: Optional[str] = None, environ=None):
    """The process group of launch_from_env(environ) (none for one process) -> (rank, world_size, device); backend
    default nccl on CUDA, gloo on the CPU."""
    launch = launch_from_env(environ)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and launch.launcher != "single":
        device = torch.device("cuda", cuda_index(launch.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if launch.world_size > 1:
        backend = backend or ("nccl" if use_cuda else "gloo")
        if launch.launcher == "torchrun":
            dist.init_process_group(backend)  # env://, the store torchrun set up
        else:
            dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size)
    return launch.rank, launch.world_size, device


def disagreement(values: list, what: str) -> Optional[str]:
    """None when every rank's value (values[r]: rank r's) is the same, else a line saying what each rank saw."""
    if all(value == values[0] for value in values):
        return None
    seen = "; ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
    return f"the processes see different {what} ({seen})"


def check_same_on_every_rank(value, what: str, hint: str):
    """RunError on every rank when the ranks' `value`s differ (all_gather_object; nothing with one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    message = disagreement(values, what)
    if message:
        raise RunError(f"{message}; {hint}")
