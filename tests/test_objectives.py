"""benchmarks/objectives.py (issue 24): the comparison's arithmetic (margins over the random network, UDI − DINO
against the seed-to-seed spread) and its flag checks before any training."""
import math

import pytest

from benchmarks import objectives


def run(**metrics):
    return {"metrics": metrics}


RUNS = {
    "random init": [run(knn_cls=40.0, dense_miou=10.0), run(knn_cls=42.0, dense_miou=12.0)],
    "dino": [run(knn_cls=45.0, dense_miou=20.0), run(knn_cls=55.0, dense_miou=22.0)],
    "udi": [run(knn_cls=60.0, knn_cls_plus=61.0, dense_miou=21.0), run(knn_cls=64.0, knn_cls_plus=63.0,
                                                                         dense_miou=23.0)],
}


def test_margins_and_the_difference_against_the_spread():
    summary = objectives.summarise(RUNS)
    assert summary["udi"]["knn_cls"] == {"mean": 62.0, "std": pytest.approx(math.sqrt(8))}
    assert "knn_cls_plus" not in summary["dino"]
    comparison = objectives.compare(summary)
    assert comparison["margins"]["dino"]["knn_cls"] == pytest.approx(9.0)
    assert comparison["margins"]["udi"]["knn_cls"] == pytest.approx(21.0)
    knn = comparison["udi_minus_dino"]["knn_cls"]
    assert knn["diff"] == pytest.approx(12.0)
    assert knn["spread"] == pytest.approx(math.hypot(math.sqrt(8), math.sqrt(50)))
    assert knn["exceeds"]
    assert not comparison["udi_minus_dino"]["dense_miou"]["exceeds"]  # 1 point against a spread of 2
    assert comparison["learns"] == {"udi": True, "dino": False}  # DINO's 9 points fall short of 10


def test_the_table_marks_what_exceeds_the_spread_and_what_is_absent():
    summary = objectives.summarise(RUNS)
    lines = objectives.table(summary, objectives.compare(summary)).splitlines()
    knn = next(line for line in lines if line.startswith("| knn_cls |"))
    assert "+12.0 (7.6) *" in knn and "+9.0" in knn and "+21.0" in knn
    miou = next(line for line in lines if line.startswith("| dense_miou |"))
    assert miou.endswith("+1.0 (2.0) |")
    assert "| knn_cls_plus | 41.0" not in lines  # the random network's cls+ is absent in RUNS
    assert next(line for line in lines if line.startswith("| linear_cls |")).count("—") == 6


def test_a_bad_training_flag_fails_before_any_training(monkeypatch):
    monkeypatch.setattr(objectives, "run_all", lambda *a: pytest.fail("trained despite a bad flag"))
    with pytest.raises(SystemExit) as exit_:
        objectives.main(["--train_flags", "--epochs -3"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        objectives.main(["--jobs", "0"])
    assert exit_.value.code == 2
