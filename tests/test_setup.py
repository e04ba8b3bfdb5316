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
