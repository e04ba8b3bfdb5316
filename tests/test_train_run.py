"""A udi.train run as a researcher meets it (issue 10 §2, §6; issue 11 §9): crop sides that are not a multiple of the
patch size, the flags and their help, the lines a run prints, and a checkpoint and log.txt that stay consistent
whenever the run is killed."""
import argparse
import json
import math
import os
import re

import pytest
import torch

from test_train import read_log, tiny_args
from udi import eval_knn, evaluation, utils
from udi.checkpoint import load_states
from udi.model import build_model
from udi.step import COLLAPSE_FRACTION, seen_boxes
from udi.step import collapse_warning as warning_for
from udi.train import PRESETS, get_args_parser, parse_args, train_udi

# ---- crop and patch sizes --------------------------------------------------------------------------------


def test_crop_sides_that_are_not_a_multiple_of_the_patch_size_train(tmp_path):
    """--patch_size 8 --local_crop_size 20 (grid 2, 4 px unseen) and a 36-px global crop (grid 4) train."""
    train_udi(tiny_args(tmp_path, "--local_crop_size", "20", "--global_crop_size", "36", "--epochs", "1"))
    assert math.isfinite(read_log(tmp_path)[0]["train_loss"])


def test_seen_boxes_cover_the_pixels_of_the_floored_grid():
    args = argparse.Namespace(global_crop_size=32, local_crop_size=20, patch_size=8)
    boxes = torch.tensor([[[0.1, 0.2, 0.9, 0.8], [0.0, 0.9, 0.5, 0.3], [0.2, 0.7, 0.6, 0.1]]])
    seen = seen_boxes(boxes, args)
    assert torch.equal(seen[:, :2], boxes[:, :2]), "global crops without remainder keep their boxes bit for bit"
    factor = (16 - 1) / (20 - 1)  # pixel centres 0..15 of 0..19 are seen
    torch.testing.assert_close(seen[0, 2], torch.tensor([0.2, 0.7, 0.2 + 0.4 * factor, 0.7 - 0.6 * factor]))
    assert seen_boxes(boxes, argparse.Namespace(global_crop_size=32, local_crop_size=16, patch_size=8)) is boxes


@pytest.mark.parametrize("flags, message", [
    (["--local_crop_size", "12"], "--local_crop_size 12 with --patch_size 8 gives a 1x1 patch grid"),
    (["--global_crop_size", "15"], "--global_crop_size 15 with --patch_size 8 gives a 1x1 patch grid"),
    (["--global_window", "5"], "--global_crop_size 32 with --patch_size 8 gives a 4x4 patch grid; SRS needs at "
                               "least 2x2 and at least --global_window (5)"),
])
def test_sizes_without_an_srs_grid_are_refused_at_parsing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, *flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch_size_per_gpu", "0", "expected an int in [1, 4096], got 0"),
    ("--batch_size_per_gpu", "-1", "expected an int in [1, 4096], got -1"),
    ("--embedded_images", "-5", "expected an int in [1, 1000000], got -5"),
    ("--epochs", "0", "expected an int in [1, 100000], got 0"),
    ("--local_window", "0", "expected an int in [1, 4096], got 0"),
    ("--local_crops_number", "-1", "expected an int in [0, 64], got -1"),
    ("--momentum_teacher", "2", "expected a finite number in [0.0, 1.0], got 2"),
    ("--momentum_teacher", "-1", "expected a finite number in [0.0, 1.0], got -1"),
    ("--batch_size_per_gpu", "1.5", "expected an int in [1, 4096], got '1.5'"),
    ("--lr", "-1", "expected a finite number in [0.0, 1000000.0], got -1"),
    ("--teacher_temp", "0", "expected a finite number in [1.1754943508222875e-38, 1000000.0], got 0"),
    ("--lr", "nan", "expected a finite number in [0.0, 1000000.0], got nan"),
    # issue 21 §10: values that reached the run (mid-run tracebacks) or grew without bound
    ("--local_crops_scale", "-0.1", "expected a finite number in (0.0, 1.0], got -0.1"),
    ("--local_crops_scale", "nan", "expected a finite number in (0.0, 1.0], got nan"),
    ("--global_crops_scale", "2.0", "expected a finite number in (0.0, 1.0], got 2.0"),
    ("--seed", "-1", "expected an int in [0, 4294967295], got -1"),
    ("--seed", str(2 ** 70), f"expected an int in [0, 4294967295], got {2 ** 70}"),
    ("--out_dim", str(2 ** 30), f"expected an int in [1, 1048576], got {2 ** 30}"),
    ("--global_crop_size", "100000", "expected an int in [1, 4096], got 100000"),
])
def test_out_of_range_flags_are_refused_at_parsing_naming_the_flag(tmp_path, capsys, flag, value, expected):
    values = [value, "0.5"] if flag.endswith("crops_scale") else [value]  # the scales take MIN MAX
    with pytest.raises(SystemExit) as exit_info:
        tiny_args(tmp_path, flag, *values)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and expected in err  # argparse names a flag with its aliases: --a/--alias


@pytest.mark.parametrize("flags, message", [
    (["--global_crops_scale", "0.9", "0.3"], "--global_crops_scale 0.9 0.3: MIN must not exceed MAX"),
    (["--local_crops_scale", "0.2", "0.1"], "--local_crops_scale 0.2 0.1: MIN must not exceed MAX"),
    (["--num_heads", "3"], "--num_heads 3 does not divide the width 32"),
    (["--embed_dim", "30", "--num_heads", "4"], "--num_heads 4 does not divide the width 30"),
    (["--arch", "resnet50"], "--arch resnet50: not a DINO name"),
    (["--warmup_epochs", "3"], "--warmup_epochs 3 exceeds --epochs 2"),
    (["--warmup_teacher_temp_epochs", "5"], "--warmup_teacher_temp_epochs 5 exceeds --epochs 2"),
    (["--embedded_data", "scenes", "--embedded_images", "100000"],
     "--embedded_images 100000: generated scenes of --global_crop_size 32 px would hold"),
    (["--embedded_images", "3"], "--embedded_images 3 give no full batch of --batch_size_per_gpu 4 x 1"),
    (["--data_path", "/no/such/folder"], "--data_path /no/such/folder: no such folder"),
    (["--output_dir", "/dev/null/run"], "--output_dir /dev/null/run: /dev/null is not a folder"),
    (["--use_fp16", "maybe"], "argument --use_fp16: expected a boolean"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
])
def test_cross_flag_constraints_are_refused_at_parsing_naming_the_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        tiny_args(tmp_path, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_knn_data_path_without_train_and_val_is_refused_at_parsing(tmp_path, capsys):
    (tmp_path / "labelled" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, "--knn_data_path", str(tmp_path / "labelled"))
    assert "needs the folders train/ and val/ (missing: val)" in capsys.readouterr().err


def test_more_embedded_digits_than_the_train_split_are_refused_at_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, "--embedded_data", "digits", "--embedded_images", "1281")
    assert "--embedded_images 1281: --embedded_data digits has 1280 train images" in capsys.readouterr().err
    assert tiny_args(tmp_path, "--embedded_data", "scenes", "--embedded_images", "4096").embedded_images == 4096


def test_evaluation_image_sizes_floor_like_training(tmp_path, capsys):
    args = tiny_args(tmp_path)
    path = tmp_path / "checkpoint.pth"
    torch.save({"args": vars(args), "teacher": build_model(args).state_dict()}, path)
    eval_knn.main(["--pretrained_weights", str(path), "--image_size", "36", "--nb_knn", "5"])
    assert re.search(r"5-NN top-1 on the embedded digits \(1280 train, 517 val images\): cls \d+\.\d\d %, "
                     r"cls\+ \d+\.\d\d %$",
                     capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"4x4 px are smaller than one patch \(patch_size 8\)"):
        eval_knn.main(["--pretrained_weights", str(path), "--image_size", "4", "--nb_knn", "5"])


# ---- flags ---------------------------------------------------------------------------------------------

def help_text(*argv):
    return " ".join(get_args_parser(*argv).format_help().split())


def test_every_flag_has_help_and_help_shows_the_active_presets_defaults():
    for action in get_args_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    assert "images per process (per GPU) (default: 128)" in help_text("reference")
    assert f"images per process (per GPU) (default: {PRESETS['demo']['batch_size_per_gpu']})" in help_text("demo")
    assert "--objective {udi,dino}" in help_text("demo")
    assert "the defaults shown are those of --preset reference" in help_text("reference").lower()


def test_dino_and_reference_flag_names_are_aliases_shown_in_help(tmp_path):
    """issue 20 §11: a main_dino.py / main_udi.py command line runs under its own flag names and value syntax."""
    assert parse_args(["--precision", "fp16"]).precision == "fp16"
    assert tiny_args(tmp_path, "--use_fp16", "true").precision == "fp16"
    assert tiny_args(tmp_path, "--use_fp16", "False").precision == "fp32"
    dino = tiny_args(tmp_path, "--optimizer", "adamw", "--dist_url", "env://", "--local_rank", "0",
                     "--global_sampling_window_size", "2", "--local_sampling_window_size", "1")
    assert (dino.global_window, dino.local_window, dino.optimizer) == (2, 1, "adamw")
    text = help_text("demo")
    for alias in ("--use_fp16", "--global_sampling_window_size", "--local_sampling_window_size", "--optimizer",
                  "--dist_url", "--local_rank"):
        assert alias in text, alias


# ---- what a run prints ----------------------------------------------------------------------------------

def test_a_run_prints_a_line_per_epoch_and_where_its_files_are(tmp_path, capsys):
    train_udi(tiny_args(tmp_path, "--lr", "0.001"))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 8, "a few lines, not an argument dump"
    assert lines[0].startswith("udi.train --preset demo ") and "--lr 0.001" in lines[0]
    assert str(tmp_path / "args.json") in lines[0]
    assert json.load(open(tmp_path / "args.json"))["lr"] == 0.001
    epoch_lines = [line for line in lines if line.startswith("epoch [")]
    assert [line.split("]")[0] for line in epoch_lines] == ["epoch [0/2", "epoch [1/2"]
    numbers = r"loss (\S+) = \(cls (\S+) \+ cls\+ (\S+) \+ patch (\S+)\) / 3 \| teacher entropy (\S+), batch (\S+) \| " \
              r"lr (\S+) \| \d+ s, (\d+) img/s$"
    keys = ("train_loss", "train_cls", "train_cls_plus", "train_patch", "train_teacher_entropy",
            "train_teacher_batch_entropy", "train_lr", "images_per_second")
    for line, record in zip(epoch_lines, read_log(tmp_path, timing=True)):
        printed = re.search(numbers, line)
        assert printed, line
        assert record["images_per_second"] > 0 and "max_memory_allocated_mib" not in record  # a CPU run
        for key, value in zip(keys, printed.groups()):
            assert float(value) == pytest.approx(record[key], rel=1e-2, abs=1e-3 if key != keys[-1] else 0.5), \
                (key, line)
    assert str(tmp_path / "checkpoint.pth") in out and str(tmp_path / "log.txt") in out


def test_collapse_warnings_name_the_entropy_and_ln_k():
    ln_k = math.log(64)
    healthy = {"teacher_entropy": 0.5 * ln_k, "teacher_batch_entropy": 0.9 * ln_k}
    assert warning_for(healthy, 64) is None
    uniform = warning_for({"teacher_entropy": COLLAPSE_FRACTION * ln_k, "teacher_batch_entropy": ln_k}, 64)
    assert "near ln K = 4.159" in uniform and "uniform" in uniform
    one_dimension = warning_for({"teacher_entropy": 0.01, "teacher_batch_entropy": 0.02}, 64)
    assert "near 0" in one_dimension and "one dimension" in one_dimension


# ---- checkpoint and log.txt under a kill (issue 11 §9) -------------------------------------------------------

class Killed(BaseException):
    """A kill: nothing of the run catches it."""


def kill_after_checkpoint(real_log_json):
    """Killed after checkpoint.pth of epoch 1 is replaced, before its log.txt line."""
    def log_json(output_dir, record):
        if record["epoch"] == 1:
            raise Killed
        real_log_json(output_dir, record)
    return log_json


def kill_in_the_log_line(real_log_json):
    """Killed halfway through writing the log.txt line of epoch 1."""
    def log_json(output_dir, record):
        if record["epoch"] == 1:
            with open(os.path.join(output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(record)[:20])
            raise Killed
        real_log_json(output_dir, record)
    return log_json


@pytest.mark.parametrize("kill", [kill_after_checkpoint, kill_in_the_log_line])
def test_a_run_killed_between_checkpoint_and_log_resumes_with_a_consistent_log(tmp_path, monkeypatch, kill):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_udi(tiny_args(straight, "--epochs", "3"))
    with monkeypatch.context() as patched:
        patched.setattr(utils, "log_json", kill(utils.log_json))
        with pytest.raises(Killed):
            train_udi(tiny_args(killed, "--epochs", "3"))
    assert torch.load(killed / "checkpoint.pth", weights_only=False)["epoch"] == 2
    train_udi(tiny_args(killed, "--epochs", "3"))
    assert read_log(killed) == read_log(straight)


def test_a_run_killed_while_writing_its_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_udi(tiny_args(straight))
    real_save = torch.save

    def save(obj, f):
        if obj["epoch"] == 2:
            f.write(b"PK\x03\x04 torn")
            raise Killed
        real_save(obj, f)
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", save)
        with pytest.raises(Killed):
            train_udi(tiny_args(killed))
    assert torch.load(killed / "checkpoint.pth", weights_only=False)["epoch"] == 1
    train_udi(tiny_args(killed))
    assert read_log(killed) == read_log(straight)


def test_an_fp16_run_resumes_from_a_checkpoint_of_the_non_fused_optimizer(tmp_path):
    """Checkpoints written before AdamW was fused store fused=None in its groups; loading them must not turn the
    optimizer non-fused under a GradScaler that hands it fused-only arguments."""
    train_udi(tiny_args(tmp_path, "--precision", "fp16", "--epochs", "1"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = None
    del checkpoint["checksum"]  # as written then: no checksum
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    train_udi(tiny_args(tmp_path, "--precision", "fp16", "--epochs", "2"))
    resumed = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert resumed["epoch"] == 2 and all(g["fused"] for g in resumed["optimizer"]["param_groups"])
    assert all(math.isfinite(r["train_loss"]) for r in read_log(tmp_path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 torn"])
def test_an_unreadable_checkpoint_is_named(tmp_path, content):
    (tmp_path / "checkpoint.pth").write_bytes(content)
    with pytest.raises(RuntimeError, match=re.escape(f"cannot load the checkpoint {tmp_path / 'checkpoint.pth'}")):
        train_udi(tiny_args(tmp_path))
    with pytest.raises(RuntimeError, match="cannot load the checkpoint"):
        evaluation.load_backbone(str(tmp_path / "checkpoint.pth"))


@pytest.mark.parametrize("content", [{"teacher": {}}, {"args": {}}, [1, 2]])
def test_a_file_that_is_not_a_udi_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(RuntimeError, match=re.escape(f"{path} is not a udi.train checkpoint: it lacks")):
        evaluation.load_backbone(str(path))


def test_resuming_a_checkpoint_of_other_settings_names_the_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": torch.nn.Linear(3, 4).state_dict()}, path)
    with pytest.raises(RuntimeError, match=re.escape(f"cannot resume from {path}: its 'student' does not fit")):
        load_states(torch.load(path, weights_only=False), str(path), student=torch.nn.Linear(3, 5))


def test_a_log_without_its_checkpoint_is_kept_aside(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 7}\n')
    train_udi(tiny_args(tmp_path, "--epochs", "1"))
    assert (tmp_path / "log.txt.old").read_text() == '{"epoch": 7}\n'
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]
