"""Every command line checks its flags when they are parsed, and every reader of a checkpoint checks the file
(issue 21 §10, §11, findings a-c): the evaluations' and udi.visualize's flags, udi.train's size bounds, the
benchmarks' --backend, --help defaults everywhere, the evaluations' checkpoint checks and the k-NN's k label."""
import argparse
import re
import subprocess
import sys

import pytest
import torch

from test_train import tiny_args
from udi import checkpoint as checkpoint_module
from udi import eval_dense, eval_embedded, eval_knn, eval_linear, visualize
from udi.cli import RESUMABLE, get_args_parser
from udi.errors import RunError
from udi.evaluation import checkpoint_parser, load_backbone
from udi.model import build_model

EVALUATIONS = {"eval_knn": eval_knn.knn_main, "eval_linear": eval_linear.linear_main, "eval_dense": eval_dense.main,
               "eval_embedded": eval_embedded.main, "visualize": visualize.main}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of udi.train's tiny network: its args and teacher, written by udi.checkpoint."""
    folder = tmp_path_factory.mktemp("run")
    args = tiny_args(folder)
    path = folder / "checkpoint.pth"
    checkpoint_module.write_checkpoint({"args": vars(args), "teacher": build_model(args).state_dict()}, str(path))
    return path


def parse_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---- the evaluations' flags (issue 21 §10) ----------------------------------------------------------------------

@pytest.mark.parametrize("evaluation, flags, message", [
    ("eval_knn", ["--nb_knn", "0"], "argument --nb_knn: expected an int in [1, 1000000], got 0"),
    ("eval_knn", ["--nb_knn", "-5"], "argument --nb_knn: expected an int in [1, 1000000], got -5"),
    ("eval_knn", ["--temperature", "nan"], "argument --temperature: expected a finite number in (0.0"),
    ("eval_knn", ["--temperature", "0"], "argument --temperature: expected a finite number in (0.0"),
    ("eval_knn", ["--holdout_fraction", "1.5"], "argument --holdout_fraction: expected a fraction strictly"),
    ("eval_knn", ["--holdout_fraction", "nan"], "argument --holdout_fraction: expected a fraction strictly"),
    ("eval_knn", ["--holdout_fraction", "0.2"], "--holdout_fraction 0.2 holds out images of --data_path, which is"),
    ("eval_knn", ["--data_path", "/no/such/folder"], "argument --data_path: /no/such/folder: no such folder"),
    ("eval_knn", ["--checkpoint_key", "studnet"], "argument --checkpoint_key: invalid choice: 'studnet'"),
    ("eval_knn", ["--image_size", "-32"], "argument --image_size: expected an int in [1, 4096], got -32"),
    ("eval_linear", ["--epochs", "0"], "argument --epochs: expected an int in [1, 100000], got 0"),
    ("eval_linear", ["--lr", "-1"], "argument --lr: expected a finite number in (0.0"),
    ("eval_linear", ["--weight_decay", "inf"], "argument --weight_decay: expected a finite number in [0.0"),
    ("eval_linear", ["--batch_size", "0"], "argument --batch_size: expected an int in [1, 1048576], got 0"),
    ("eval_dense", ["--image_size", "1e9"], "argument --image_size: expected an int in [1, 4096], got '1e9'"),
    ("eval_embedded", ["--output", "/dev/null/m.json"], "argument --output: /dev/null/m.json: /dev/null is not a"),
    ("visualize", ["--num_images", "0"], "argument --num_images: expected an int in [1, 517], got 0"),
    ("visualize", ["--seed", "-1"], "argument --seed: expected an int in [0, 4294967295], got -1"),
    ("visualize", ["--image_path", "/no/such.png"], "argument --image_path: /no/such.png: no such file"),
    ("visualize", ["--output_dir", "/dev/null/maps"], "argument --output_dir: /dev/null/maps: /dev/null is not a"),
])
def test_evaluation_flags_are_checked_when_parsed(checkpoint, capsys, evaluation, flags, message):
    err = parse_error(EVALUATIONS[evaluation], ["--pretrained_weights", str(checkpoint), *flags], capsys)
    assert message in err, err


def test_a_split_data_path_with_a_holdout_fraction_and_a_missing_checkpoint_are_parser_errors(tmp_path, checkpoint,
                                                                                               capsys):
    (tmp_path / "train").mkdir()
    err = parse_error(eval_knn.knn_main, ["--pretrained_weights", str(checkpoint), "--data_path", str(tmp_path),
                                          "--holdout_fraction", "0.2"], capsys)
    assert f"--data_path {tmp_path} is already split (train/)" in err
    err = parse_error(eval_knn.knn_main, ["--pretrained_weights", str(tmp_path / "none.pth")], capsys)
    assert f"argument --pretrained_weights: {tmp_path / 'none.pth'}: no such file" in err


def test_visualize_refuses_more_images_than_the_held_out_split(checkpoint, capsys):
    err = parse_error(visualize.main, ["--pretrained_weights", str(checkpoint), "--embedded_data", "scenes",
                                       "--num_images", "513"], capsys)
    assert "--num_images 513: the embedded scenes hold 512 held-out images" in err


# ---- udi.train's size bounds and cross-flag checks (issue 21 §10) -------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--embed_dim", "8192", "--depth", "64", "--num_heads", "64"],
     "would have about 51.8 billion parameters; at most 2.1 billion"),
    (["--out_dim", str(2 ** 20), "--head_bottleneck_dim", "16384"], "--out_dim 1048576 would have about"),
    (["--batch_size_per_gpu", "4096", "--global_crop_size", "1024", "--embedded_images", "4096"],
     "gives 96.0 GiB of views per batch; at most 16 GiB"),
    (["--embedded_data", "digits", "--global_crop_size", "2048", "--embedded_images", "1280"],
     "--embedded_images 1280: generated digits of --global_crop_size 2048 px would hold 200.0 GiB"),
    (["--knn_data_path", "KNN"], "is read by the final evaluation, which --final_eval false skips"),
    (["--teacher_temp", "1e-40"], "--teacher_temp: expected a finite number in [1.1754943508222875e-38,"),
    (["--warmup_teacher_temp", "1e-39"], "--warmup_teacher_temp: expected a finite number in [1.17549"),
])
def test_sizes_and_unused_flags_are_refused_when_parsed(tmp_path, capsys, flags, message):
    (tmp_path / "KNN" / "train").mkdir(parents=True)
    (tmp_path / "KNN" / "val").mkdir()
    flags = [str(tmp_path / "KNN") if f == "KNN" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        tiny_args(tmp_path / "run", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_reference_preset_on_embedded_digits_still_parses(tmp_path):
    """benchmarks/train_step.py's GPU configuration: 1280 digits at 224 px (2.4 GiB) are within the bound."""
    get_args_parser("reference").parse_args(["--output_dir", str(tmp_path)])
    from udi.cli import parse_args
    assert parse_args(["--preset", "reference", "--output_dir", str(tmp_path)]).global_crop_size == 224


def test_help_says_which_flags_a_resume_may_change():
    text = " ".join(get_args_parser().format_help().split())
    listed = re.search(r"These flags may differ from the checkpoint's: (.*?); the run says which did", text).group(1)
    assert set(listed.replace(" ", "").split(",")) == {f"--{flag}" for flag in RESUMABLE}
    assert "Any other flag that differs (data, model, crops, objective) is refused" in text
    assert {"seed", "lr"} <= RESUMABLE


# ---- --help defaults and the benchmarks' --backend (findings b, c) --------------------------------------------

def parsers():
    evaluations = [checkpoint_parser("x"), checkpoint_parser("x", data_path=False), visualize.visualize_parser()]
    return [get_args_parser("demo"), get_args_parser("reference")] + evaluations


@pytest.mark.parametrize("parser", parsers(), ids=["train-demo", "train-reference", "eval", "eval-embedded",
                                                   "visualize"])
def test_help_shows_every_default(parser):
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default not in (None, argparse.SUPPRESS) and action.help not in (None, argparse.SUPPRESS):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"(default: {shown})" in text or f"(default: {action.default})" in text, action.option_strings


@pytest.mark.parametrize("benchmark", ["distill_cross_entropy", "linear_distill_cross_entropy"])
def test_benchmark_backends_are_argparse_choices(benchmark):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", "--backend", "bogus"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "argument --backend: invalid choice: 'bogus'" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    assert "(default: False)" in help_text and "{auto,native,triton,reference}" in help_text


# ---- the evaluations read checkpoints as udi.train does (issue 21 §11) ------------------------------------------

def damaged(tmp_path, checkpoint, change):
    state = torch.load(checkpoint, weights_only=False)
    del state["checksum"]
    change(state)
    path = tmp_path / "damaged.pth"
    checkpoint_module.write_checkpoint(state, str(path))
    return path


def set_entry(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("teacher"), "is not a udi.train checkpoint: it lacks ['teacher']"),
    (set_entry("args", ["--arch", "vit_small"]), "its 'args' is a list, not the dict of the flags"),
    (set_entry("teacher", [1, 2]), "its 'teacher' is a list, not a state dict of tensors"),
    (set_entry("weights", {}), "unexpected entries ['weights']"),
    (set_entry("epoch", 3), "its 'epoch' (3) and 'log' (NoneType) do not describe the same epochs"),
    (lambda state: state["args"].pop("arch"), "its 'args' do not describe a network udi.train builds"),
    (lambda state: state["args"].update(embed_dim=48), "its 'teacher' does not fit the network its 'args' describe"),
    (lambda state: state["teacher"]["backbone.pos_embed"].fill_(float("inf")),
     "holds non-finite weights (teacher.backbone.pos_embed)"),
])
def test_a_damaged_checkpoint_is_refused_by_every_evaluation(tmp_path, checkpoint, change, message):
    path = damaged(tmp_path, checkpoint, change)
    with pytest.raises(RunError, match=re.escape(f"{path}")) as error:
        load_backbone(str(path))
    assert message in str(error.value) and "give a checkpoint.pth that udi.train wrote" in str(error.value)


@pytest.mark.parametrize("evaluation", list(EVALUATIONS))
def test_every_evaluation_refuses_a_corrupted_checkpoint_in_one_line(tmp_path, checkpoint, evaluation):
    data = bytearray(checkpoint.read_bytes())
    weight = torch.load(checkpoint, weights_only=False)["teacher"]["backbone.pos_embed"]
    at = bytes(data).index(weight.numpy().tobytes()[:64])
    data[at:at + 64] = bytes(64 * [0x3F])  # same length, finite float32 patterns: only the checksum tells
    path = tmp_path / "corrupted.pth"
    path.write_bytes(bytes(data))
    main = {"eval_knn": eval_knn.main, "eval_linear": eval_linear.main}.get(evaluation)
    with pytest.raises(SystemExit) as exit_info:
        if main:
            main(["--pretrained_weights", str(path)])
        else:
            from udi.evaluation import run_main
            run_main(EVALUATIONS[evaluation], ["--pretrained_weights", str(path)])
    assert str(exit_info.value.code).startswith(f"error: {path} is corrupted: the checksum of its payload")


# ---- the k-NN says which k it used (finding a) ------------------------------------------------------------------

def test_knn_labels_the_k_it_used(checkpoint, capsys):
    eval_knn.knn_main(["--pretrained_weights", str(checkpoint), "--nb_knn", "5", "5000", "--image_size", "32"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("5-NN top-1 on the embedded digits (1280 train, 517 val images)")
    assert lines[-1].startswith("1280-NN (--nb_knn 5000 capped at the train images) top-1 on the embedded digits "
                                "(1280 train, 517 val images)")


def test_a_new_run_keeps_an_args_json_it_did_not_write(tmp_path, capsys):
    from udi.train import train_udi
    (tmp_path / "args.json").write_text('{"someone": "else"}')
    train_udi(tiny_args(tmp_path, "--epochs", "1"))
    assert (tmp_path / "args.json.old").read_text() == '{"someone": "else"}'
    assert '"epochs": 1' in (tmp_path / "args.json").read_text()
    assert f"{tmp_path / 'args.json'} had no checkpoint.pth: kept as {tmp_path / 'args.json'}.old" in \
        capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda state: next(iter(state["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan")),
     "holds non-finite weights (optimizer.state."),
    (lambda state: state["log"].__setitem__(0, "epoch 0"), "its 'epoch' (1) and 'log' (1 records) do not describe"),
    (set_entry("scaler", 5), "its 'scaler' should be a dict, found int"),
])
def test_a_checkpoint_to_resume_with_damaged_state_is_refused(tmp_path, change, message):
    from udi.train import train_udi
    train_udi(tiny_args(tmp_path, "--epochs", "1"))
    path = damaged(tmp_path, tmp_path / "checkpoint.pth", change)
    path.replace(tmp_path / "checkpoint.pth")
    with pytest.raises(RunError, match=re.escape(message)):
        train_udi(tiny_args(tmp_path, "--epochs", "2"))


@pytest.mark.parametrize("name", ["checkpoint.pth", "checkpoint0002.pth"])
def test_a_dangling_checkpoint_link_is_refused_and_kept(tmp_path, name):
    """A checkpoint linked onto a disk that is not mounted is not "no checkpoint": the run stops naming the file and
    leaves the link as it was."""
    from udi.train import train_udi
    link = tmp_path / name
    link.symlink_to(tmp_path / "elsewhere" / "checkpoint.pth")
    with pytest.raises(RunError, match=re.escape(str(link))):
        train_udi(tiny_args(tmp_path, "--epochs", "2", "--saveckp_freq", "1"))
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [name]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # what a hostile file could do: here, create a marker file


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    """torch.load(weights_only=True): udi.train and every evaluation refuse it by name, and nothing of it ran."""
    from udi.train import train_udi
    marker = tmp_path / "ran"
    torch.save({"student": _RunsCodeWhenUnpickled(marker)}, tmp_path / "checkpoint.pth")
    with pytest.raises(RunError, match="loading it could run code"):
        train_udi(tiny_args(tmp_path, "--epochs", "1"))
    with pytest.raises(RunError, match="loading it could run code"):
        load_backbone(str(tmp_path / "checkpoint.pth"))
    assert not marker.exists()
