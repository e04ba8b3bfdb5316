"""Multi-node runs (issue 23 §4): the launch environment (torchrun's, srun's) read by udi.distributed, SLURM host
lists, and CPU runs on localhost (gloo): 2 nodes x 1 process as two torchrun agents (c10d rendezvous) against
1 node x 2 processes and against srun's environment without torchrun, what each rank writes, and resuming a
checkpoint on another layout of as many processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import _free_port, read_log
from test_train_first_hour import image_folder
from udi import distributed
from udi.cli import parse_args
from udi.distributed import Launch, cuda_index, disagreement, expand_hostlist, launch_from_env
from udi.errors import RunError
from udi.train import get_args_parser, train_udi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDITED_TRAIN = os.path.join(ROOT, "tests", "audited_train.py")

# ---- the environment: pure functions, no process group --------------------------------------------------------


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[01-02],gpu[1-2],login", ["node01", "node02", "gpu1", "gpu2", "login"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),  # the width of the first number: no padding
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node[3]-ib,10.0.0.[1-2]", ["node3-ib", "10.0.0.1", "10.0.0.2"]),
])
def test_slurm_host_lists_expand_in_order(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "node[01-", "node]", "node[4-2]", "node[a-b]", "node[1-3:2]", "a,,b",
                                  "node[]"])
def test_a_malformed_host_list_is_a_value_error_naming_it(text):
    with pytest.raises(ValueError, match="SLURM host list|is not a list of numbers"):
        expand_hostlist(text)


SRUN = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[07-10]",
            SLURM_JOB_ID="123456")


@pytest.mark.parametrize("environ, launch", [
    ({}, distributed.SINGLE),
    (dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1234"),
     Launch(3, 4, 1, "torchrun", "h", 1234)),
    (dict(RANK="0", WORLD_SIZE="1"), Launch(0, 1, 0, "torchrun")),
    (SRUN, Launch(5, 8, 1, "srun", "gpu07", 29500 + 456)),
    ({**SRUN, "SLURM_STEP_NODELIST": "gpu[09-10]"}, Launch(5, 8, 1, "srun", "gpu09", 29500 + 456)),
    ({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}, Launch(5, 8, 1, "srun", "head", 4000)),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, Launch(5, 8, 1, "srun", "gpu07", 29500)),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0"), distributed.SINGLE),  # a one-task job
    # torchrun started by srun inside a job: torchrun's variables win
    ({**SRUN, "RANK": "2", "WORLD_SIZE": "16", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "9"},
     Launch(2, 16, 2, "torchrun", "h", 9)),
])
def test_the_launch_is_read_from_torchrun_or_srun(environ, launch):
    assert launch_from_env(environ) == launch


TORCHRUN = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="29500")


def without(environ, *names):
    return {k: v for k, v in environ.items() if k not in names}


@pytest.mark.parametrize("environ, message", [
    (without(TORCHRUN, "WORLD_SIZE"), "RANK is set but WORLD_SIZE is not"),
    (without(TORCHRUN, "RANK"), "WORLD_SIZE is set but RANK is not"),
    ({**TORCHRUN, "RANK": "2"}, "RANK and WORLD_SIZE: rank 2 is not below the world size 2"),
    ({**TORCHRUN, "RANK": "one"}, "RANK='one' is not an integer"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 is outside \[1, inf\]"),
    ({**TORCHRUN, "RANK": "-1"}, r"RANK=-1 is outside \[0, inf\]"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK and LOCAL_WORLD_SIZE: rank 1 is not below"),
    (without(TORCHRUN, "MASTER_ADDR"), "MASTER_ADDR not"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is outside \[1, 65535\]"),
    (without(SRUN, "SLURM_NTASKS"), "SLURM_PROCID is set but SLURM_NTASKS not"),
    (without(SRUN, "SLURM_LOCALID"), "SLURM_PROCID is set but SLURM_LOCALID not"),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID and SLURM_NTASKS: rank 8 is not below the world size 8"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[07-"}, "SLURM_JOB_NODELIST: 'gpu\\[07-' is not a SLURM host list.*export "
                                                "MASTER_ADDR"),
    (without(SRUN, "SLURM_JOB_NODELIST"), "none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST nor "
                                          "MASTER_ADDR"),
    ({**SRUN, "MASTER_PORT": "x"}, "MASTER_PORT='x' is not an integer"),
])
def test_an_inconsistent_environment_is_a_run_error_naming_the_variables(environ, message):
    with pytest.raises(RunError, match=message):
        launch_from_env(environ)


def test_a_local_rank_gets_its_cuda_device_or_an_error():
    assert cuda_index(0, 4) == 0 and cuda_index(3, 4) == 3
    assert cuda_index(3, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    with pytest.raises(RunError, match="local rank 4 has no CUDA device: this node shows 2"):
        cuda_index(4, 2)


def test_disagreeing_ranks_are_named():
    assert disagreement(["a", "a", "a"], "files") is None
    assert disagreement(["a", "b"], "files") == "the processes see different files (rank 0: a; rank 1: b)"


def test_the_flags_count_the_processes_of_srun(tmp_path, monkeypatch, capsys):
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--embedded_images", "16", "--batch_size_per_gpu", "4", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2 and "give no full batch of --batch_size_per_gpu 4 x 8 process(es)" in \
        capsys.readouterr().err


def test_an_inconsistent_environment_is_one_line_and_exit_status_1(tmp_path, monkeypatch, capsys):
    from udi.train import main
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == ("udi.train: error: RANK is set but WORLD_SIZE is not: torchrun sets "
                                            "both (unset RANK to run one process)\n")
    assert not (tmp_path / "run").exists()


def test_help_and_readme_name_the_launchers():
    text, readme = get_args_parser().epilog, open(os.path.join(ROOT, "README.md")).read()
    command = "torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m udi.train"
    assert command in text
    for name in ("srun python -m udi.train", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
                 "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        assert name in text and name in readme, name
    assert "## Multi-node" in readme and command in readme and "#SBATCH --nodes" in readme
    assert "tests/test_multinode.py" in readme


# ---- launches on localhost (gloo) ------------------------------------------------------------------------------

# the demo preset on 16 embedded digits, a tiny ViT with stochastic depth (each rank draws its own), 2 epochs
TINY = ["--preset", "demo", "--embedded_data", "digits", "--embedded_images", "16", "--batch_size_per_gpu", "4",
        "--epochs", "2", "--warmup_epochs", "1", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
        "--patch_size", "8", "--local_crop_size", "16", "--global_window", "2", "--local_window", "1", "--out_dim",
        "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--drop_path_rate", "0.2", "--final_eval",
        "false", "--saveckp_freq", "1"]
LAUNCH_TIMEOUT = 240  # seconds for all processes of one launch: a rendezvous that hangs fails the test
RENDEZVOUS = ["--rdzv-backend", "c10d", "--rdzv-conf", "join_timeout=60", "--max-restarts", "0",
              "--monitor-interval", "0.2"]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(audit_dir, **variables) -> dict:
    """This environment without any launcher's variables, one thread, the reference backend, the CPU."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", UDI_KERNELS_BACKEND="reference", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="",
               UDI_AUDIT_DIR=str(audit_dir), **variables)
    return env


def launch(folder, launches: dict) -> dict:
    """Start the processes of every launch (name -> [(command, env)]) at once in `folder`, each writing its output
    (stdout and stderr) to folder/NAME.I.log; -> name -> [(exit status, output)]. Processes still running after
    LAUNCH_TIMEOUT are killed and the test fails."""
    started = {name: [(subprocess.Popen(command, cwd=folder, env=env, stdout=open(folder / f"{name}.{i}.log", "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True), folder / f"{name}.{i}.log")
                       for i, (command, env) in enumerate(commands)] for name, commands in launches.items()}
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for processes in started.values():
            for process, _ in processes:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process, _ in (p for processes in started.values() for p in processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return {name: [(process.returncode, log.read_text()) for process, log in processes]
            for name, processes in started.items()}


def succeeded(results) -> list:
    """The outputs of a launch whose processes all exited 0."""
    assert all(code == 0 for code, _ in results), "\n".join(output[-3000:] for _, output in results)
    return [output for _, output in results]


def torchrun(folder, name, nodes, processes, *flags) -> list:
    """The commands of `nodes` torchrun agents of `processes` each on localhost, one c10d rendezvous: output_dir
    folder/name, the audits in folder/name.audit."""
    (folder / f"{name}.audit").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
               str(processes), "--rdzv-endpoint", f"localhost:{_free_port()}", *RENDEZVOUS, AUDITED_TRAIN, *TINY,
               "--output_dir", name, *flags]
    return [(command, child_env(folder / f"{name}.audit"))] * nodes


def srun(folder, name, tasks, *flags) -> list:
    """The commands of `tasks` processes with srun's environment, one task per (pretend) node of
    "localhost,node[02-..]", no torchrun: MASTER_ADDR from the host list, MASTER_PORT exported (a free one)."""
    (folder / f"{name}.audit").mkdir()
    command = [sys.executable, AUDITED_TRAIN, *TINY, "--output_dir", name, *flags]
    slurm = dict(SLURM_NTASKS=str(tasks), SLURM_LOCALID="0", SLURM_JOB_NODELIST=f"localhost,node[02-{tasks:02d}]",
                 MASTER_PORT=str(_free_port()))
    return [(command, child_env(folder / f"{name}.audit", SLURM_PROCID=str(task), **slurm)) for task in range(tasks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 epochs as 2 nodes x 1 process and as 1 node x 2 processes (at once); then (at once) the first resumed to
    3 epochs under srun, the second as 2 nodes x 1 process: folder, name -> the outputs of each node's process."""
    folder = tmp_path_factory.mktemp("multinode")
    outputs = launch(folder, {"two_nodes": torchrun(folder, "two_nodes", 2, 1),
                              "one_node": torchrun(folder, "one_node", 1, 2)})
    for first, then in (("two_nodes", "then_srun"), ("one_node", "then_two_nodes")):
        shutil.copytree(folder / first, folder / then)
    outputs.update(launch(folder, {"then_srun": srun(folder, "then_srun", 2, "--epochs", "3"),
                                   "then_two_nodes": torchrun(folder, "then_two_nodes", 2, 1, "--epochs", "3")}))
    return folder, {name: succeeded(results) for name, results in outputs.items()}


def checkpoint(folder, name) -> dict:
    return torch.load(folder / name / "checkpoint.pth", weights_only=False)


def assert_same_run(folder, a, b):
    """Bit for bit: the same reduction (gloo, 2 ranks, one thread each) of the same shards gives the same floats."""
    one, other = checkpoint(folder, a), checkpoint(folder, b)
    for entry in ("student", "teacher", "udi_loss"):
        assert one[entry].keys() == other[entry].keys()
        for key, value in one[entry].items():
            assert torch.equal(value, other[entry][key]), f"{entry}.{key}"
    for key, state in one["optimizer"]["state"].items():
        assert all(torch.equal(v, other["optimizer"]["state"][key][k]) for k, v in state.items()), key
    assert [r["torch"].tolist() for r in one["rng"]] == [r["torch"].tolist() for r in other["rng"]]
    assert read_log(folder / a) == read_log(folder / b)  # less udi.train.TIMING_FIELDS
    return one


def test_two_nodes_of_one_process_train_as_one_node_of_two(runs):
    folder, _ = runs
    state = assert_same_run(folder, "two_nodes", "one_node")
    assert state["epoch"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"]), "each rank its own seed"


@pytest.mark.parametrize("name", ["two_nodes", "one_node", "then_srun", "then_two_nodes"])
def test_rank_1_writes_nothing_and_prints_nothing(runs, name):
    folder, outputs = runs
    audit = {rank: json.loads((folder / f"{name}.audit" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert audit[1] == [], audit[1]
    assert {"open checkpoint.pth.tmp", "os.rename checkpoint.pth", "open log.txt"} <= set(audit[0]), audit[0]
    expected = {"args.json", "checkpoint.pth", "log.txt", "checkpoint0001.pth", "checkpoint0002.pth"}
    if name.startswith("then"):
        expected |= {"args.resume0002.json", "checkpoint0003.pth"}
    assert set(os.listdir(folder / name)) == expected
    printed = "".join(outputs[name])  # one output per node (agent or srun task): rank 1's among them
    assert printed.count("udi.train --preset demo") == 1 and printed.count("training time") == 1
    silent = [output for output in outputs[name] if "udi.train --preset demo" not in output]
    assert len(silent) == len(outputs[name]) - 1 and not any("epoch [" in output for output in silent)


def test_a_checkpoint_resumes_on_another_layout_of_as_many_processes_and_srun_trains_as_torchrun(runs):
    folder, _ = runs
    resumed = assert_same_run(folder, "then_srun", "then_two_nodes")
    assert resumed["epoch"] == 3 and [r["epoch"] for r in resumed["log"]] == [0, 1, 2]
    assert read_log(folder / "then_srun")[:2] == read_log(folder / "two_nodes")


def test_a_checkpoint_of_two_processes_is_refused_by_one(runs):
    folder, _ = runs
    before = {name: os.path.getmtime(folder / "two_nodes" / name) for name in os.listdir(folder / "two_nodes")}
    with pytest.raises(RunError, match="was written by 2 process\\(es\\), this run has 1: resume it with as many"):
        train_udi(parse_args(TINY + ["--output_dir", str(folder / "two_nodes"), "--epochs", "3"]))
    assert {name: os.path.getmtime(folder / "two_nodes" / name) for name in os.listdir(folder / "two_nodes")} == before


def test_an_unreadable_image_on_rank_1_is_printed_by_rank_1(tmp_path):
    data = image_folder(tmp_path / "data", count=8)
    for path in (data / "class0").iterdir():
        path.write_text("not a picture")
    (rank_0, output_0), (rank_1, output_1) = launch(tmp_path, {"run": srun(tmp_path, "run", 2, "--data_path",
                                                                          str(data))})["run"]
    assert rank_0 == rank_1 == 1
    assert "error: rank 0: cannot read the image" in output_0 and "error: rank 1: cannot read the image" in output_1
