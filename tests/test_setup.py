"""Set-up and tooling (issue 10 §7): the extension knows the torch it was built against and refuses another one;
benchmarks write into an ignored folder unless asked to record."""
import os
import subprocess
import sys

import pytest
import torch

import udi_kernels
from benchmarks import common


def test_the_build_records_its_torch_version():
    from udi_kernels._build_info import TORCH_VERSION
    assert TORCH_VERSION == torch.__version__ and udi_kernels._native.native_loaded()


def test_an_extension_built_for_another_torch_fails_at_import_naming_both_versions():
    code = "import torch; torch.__version__ = '2.0.0+other'; import udi_kernels"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: udi_kernels._C was built against torch")
    assert torch.__version__ in last and "2.0.0+other" in last and "--no-build-isolation" in last


@pytest.mark.parametrize("argv, out", [([], common.SCRATCH_DIR), (["--record"], common.RECORDED_DIR),
                                       (["--out", "elsewhere"], "elsewhere")])
def test_benchmarks_write_to_the_ignored_folder_unless_recording(monkeypatch, argv, out):
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    assert common.parse_args("bench").out == out


def test_benchmark_output_folder_is_ignored_and_record_excludes_out(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/out/x.json"], cwd=root, timeout=60).returncode == 0
    monkeypatch.setattr(sys, "argv", ["bench", "--record", "--out", "elsewhere"])
    with pytest.raises(SystemExit):
        common.parse_args("bench")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))
BENCHMARKS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                    if f.endswith(".py") and "def main(" in open(os.path.join(ROOT, "benchmarks", f)).read())


# Runs every benchmark's --help in one process, each from a clean slate: no repository package imported, the
# path as `python benchmarks/x.py` (its folder first) or `python -m benchmarks.x` (the working directory) sets it.
RUN_BENCHMARKS = """
import os, runpy, sys
way, root, names = sys.argv[1], sys.argv[2], sys.argv[3:]
base = [p for p in sys.path if p not in ("", os.getcwd())]
for name in names:
    for module in [m for m in sys.modules if m.split(".")[0] in ("benchmarks", "udi")]:
        del sys.modules[module]
    path = os.path.join(root, "benchmarks", name + ".py")
    sys.path[:] = [os.path.dirname(path) if way == "script" else os.getcwd()] + base
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__") if way == "script" else \
            runpy.run_module("benchmarks." + name, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        assert exit_.code in (0, None), (name, exit_.code)
"""


@pytest.mark.parametrize("way", ["script", "module"])
def test_every_benchmark_runs_as_a_script_and_as_a_module(tmp_path, way):
    """issue 20 §7: `python benchmarks/x.py` (from anywhere) and `python -m benchmarks.x` (from the root)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RUN_BENCHMARKS, way, ROOT, *BENCHMARKS],
                            cwd=tmp_path if way == "script" else ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage:") == len(BENCHMARKS), result.stdout


def test_a_benchmark_prints_every_file_it_writes(tmp_path, capsys):
    device = torch.device("cpu")
    chart = ("title", ["a", "b"], {"x": [1.0, 2.0]}, "ms")
    common.finish(str(tmp_path), "bench", device, {"rows": []}, chart, [{"k": 1}], [("k", "k", "{}")])
    out = capsys.readouterr().out
    written = sorted(os.listdir(tmp_path))
    assert written == ["bench_cpu.json", "bench_cpu.png"]
    assert all(str(tmp_path / name) in out for name in written), out


@pytest.mark.parametrize("build_status", [0, 3])
def test_setup_script_exits_with_the_builds_status(tmp_path, build_status):
    """Runs scripts/setup.sh in a copy whose .venv/bin/python is a stub: every step succeeds, and the package build
    (the step with the progress heartbeat) takes 2 s and exits with `build_status`. The script's own control flow
    decides the rest; it once exited 1 after a successful build (its exit trap's status)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(open(os.path.join(root, "scripts", "setup.sh")).read())
    stub = tmp_path / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(f'#!/bin/sh\ncase "$*" in *--no-build-isolation*) sleep 2; exit {build_status};; esac\nexit 0\n')
    stub.chmod(0o755)
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == build_status, result.stdout + result.stderr
    assert "4/4" in result.stdout and ("done" in result.stdout) == (build_status == 0)


def test_setup_script_reuses_a_venv_with_the_right_torch_and_an_up_to_date_build(tmp_path):
    """issue 20 §8: the second of the README's two commands does not download torch nor compile again; a changed
    source does compile again. The stub .venv/bin/python logs the pip calls and "has" torch once installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(open(os.path.join(root, "scripts", "setup.sh")).read())
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "op.cpp").write_text("int op();\n")
    stub = tmp_path / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nhere=$(dirname "$0")/../..\ncase "$*" in\n'
                    '  *--no-build-isolation*) echo build >> "$here/calls";;\n'
                    '  *"install -q torch=="*) echo torch >> "$here/calls"; touch "$here/has_torch";;\n'
                    '  *"import torch, torchvision"*) [ -f "$here/has_torch" ] && echo 2.14.1+cpu;;\n'
                    'esac\nexit 0\n')
    stub.chmod(0o755)

    def setup():
        result = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, env={**os.environ, "UDI_TORCH_VERSION": "2.14.1"})
        assert result.returncode == 0, result.stdout + result.stderr
        calls = (tmp_path / "calls").read_text().split()
        (tmp_path / "calls").write_text("")
        return calls, result.stdout

    assert setup()[0] == ["torch", "build"]
    calls, out = setup()
    assert calls == [] and "kept (nothing downloaded)" in out and "up to date" in out and "not rebuilt" in out
    (tmp_path / "csrc" / "op.cpp").write_text("int op(int);\n")
    assert setup()[0] == ["build"]
    assert setup()[0] == []


@pytest.mark.skipif(udi_kernels._native.BUILD_CPU_ISA == "default", reason="a portable build (UDI_KERNELS_CPU_ISA)")
def test_a_vectorised_build_refuses_to_load_on_a_cpu_without_its_instructions():
    code = ("import builtins, io; real = builtins.open; "
            "builtins.open = lambda f, *a, **k: io.StringIO('flags\\t: fpu sse2 sse4_2\\n') "
            "if f == '/proc/cpuinfo' else real(f, *a, **k); "
            "import udi_kernels._native as n; print(n.native_loaded(), n.LOAD_ERROR)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False") and "UDI_KERNELS_CPU_ISA=default" in result.stdout
    assert not udi_kernels._native.cpu_lacks(udi_kernels._native.BUILD_CPU_ISA)  # this CPU loaded it


@pytest.mark.skipif(not udi_kernels._native.native_loaded(), reason="extension not built")
def test_the_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is inline and runs its body on one thread where the extension lacks -fopenmp (no error, only
    half the speed on 2 cores): the built library must call into the OpenMP runtime."""
    with open(udi_kernels._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()


def test_the_build_picks_the_widest_instruction_set_this_cpu_runs():
    from udi_kernels import cpu_isa
    assert cpu_isa.runs("default") in (True, None)
    widest = cpu_isa.widest_isa()
    assert all(cpu_isa.runs(isa) is not True for isa in list(cpu_isa.REQUIRED_CPU_FLAGS)[:list(
        cpu_isa.REQUIRED_CPU_FLAGS).index(widest)])


def test_a_run_on_a_loaded_machine_is_not_recorded(monkeypatch, tmp_path):
    recorded, scratch = tmp_path / "results", tmp_path / "out"
    monkeypatch.setattr(common, "RECORDED_DIR", str(recorded))
    monkeypatch.setattr(common, "SCRATCH_DIR", str(scratch))
    load = dict(cpus=2, load_average_1min_before=1.5, load_average_1min_after=2.5, other_processes_cores=1.2)
    monkeypatch.setattr(common, "machine_load", lambda: dict(load, loaded=True))
    path = common.write_json(str(recorded), "bench", torch.device("cpu"), {"fastest": {}})
    assert os.path.dirname(path) == str(scratch) and not recorded.exists()
    monkeypatch.setattr(common, "machine_load", lambda: dict(load, loaded=False))
    assert os.path.dirname(common.write_json(str(recorded), "bench", torch.device("cpu"), {})) == str(recorded)


def test_machine_load_counts_only_other_processes():
    common.start_run()
    sum(i * i for i in range(3_000_000))  # this process' own work
    load = common.machine_load()
    assert load["cpus"] == os.cpu_count() and "load_average_1min_before" in load and "load_average_1min_after" in load
    assert load["other_processes_cores"] is None or 0 <= load["other_processes_cores"] <= os.cpu_count()


def test_interleaved_times_every_step_once_per_round():
    calls = []
    results = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 torch.device("cpu"), quick=True)
    assert set(results) == {"a", "b"} and all(len(r["rounds_ms"]) == common.ROUNDS for r in results.values())
    assert results["a"]["ms"] == sorted(results["a"]["rounds_ms"])[common.ROUNDS // 2]
