"""--compile (issue 23 §1, udi/compiled.py): the compiled step against the eager one on a tiny UDI config, over
steps whose seed, epoch, teacher momentum and parameters change, through the teacher temperature's warm-up.

Counted with torch._dynamo.utils.counters: no graph break anywhere (the blocks included), the graphs the design
says (student and teacher forwards from the first step; the loss and its diagnostics once the temperature is
constant) and no recompile after them. Tolerances (float32, inductor reorders sums): loss and its scalars rtol
1e-5, atol 1e-5; every gradient within 1e-4 of the largest gradient of the student (absolute, the scale of the
update; biases before the head's BatchNorm have gradients of rounding size); centers and BatchNorm statistics
rtol 1e-5, atol 1e-6.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.train_step import make_batch
from udi import utils
from udi.cli import parse_args
from udi.step import build_step

WARMUP_EPOCHS = 1
EPOCHS = (0, 1, 2, 3)  # epoch 0: the temperature's warm-up (the loss eager), then constant
GRAPHS_AFTER = (2, 4, 4, 4)  # student + teacher forward; + loss forward + teacher_entropies


def tiny_args(compile_step: bool, grad_checkpointing: bool):
    return parse_args(["--preset", "demo", "--embedded_data", "images", "--embedded_images", "8", "--embed_dim",
                       "32", "--depth", "2", "--num_heads", "2", "--out_dim", "64", "--head_hidden_dim", "64",
                       "--head_bottleneck_dim", "32", "--global_crop_size", "16", "--local_crop_size", "8",
                       "--batch_size_per_gpu", "4", "--epochs", "10", "--warmup_teacher_temp_epochs",
                       str(WARMUP_EPOCHS), "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07",
                       "--grad_checkpointing", str(grad_checkpointing), "--compile", str(compile_step)])


def run_step(step, views, boxes, epoch: int, iteration: int) -> dict:
    """One training step (backward, a plain SGD update, the teacher's EMA at this step's momentum); what it
    computed."""
    step.student.zero_grad(set_to_none=True)
    loss, scalars = step(views, boxes, epoch, utils.step_seed(0, iteration))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in step.student.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in step.student.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    step.update_teacher(0.9 + 0.02 * iteration)
    return dict(scalars={k: v.detach() for k, v in scalars.items()}, grads=grads,
                loss_state={k: v.clone() for k, v in step.loss.state_dict().items()},
                buffers={k: v.clone() for k, v in step.student.named_buffers()})


def assert_same_step(eager: dict, compiled: dict):
    for name, value in eager["scalars"].items():
        torch.testing.assert_close(compiled["scalars"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert compiled["grads"].keys() == eager["grads"].keys()
    scale = max(g.abs().max() for g in eager["grads"].values())
    for name, grad in eager["grads"].items():
        assert (compiled["grads"][name] - grad).abs().max() <= 1e-4 * scale, name
    for kind in ("loss_state", "buffers"):
        for name, value in eager[kind].items():
            torch.testing.assert_close(compiled[kind][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_step_matches_eager_without_recompiles(grad_checkpointing):
    torch._dynamo.reset()
    counters.clear()
    steps = {}
    for compiled in (False, True):
        utils.fix_random_seeds(0)
        steps[compiled] = build_step(tiny_args(compiled, grad_checkpointing))
    views, boxes = make_batch(steps[False].args, 4, torch.device("cpu"))
    for iteration, (epoch, graphs) in enumerate(zip(EPOCHS, GRAPHS_AFTER)):
        eager = run_step(steps[False], views, boxes, epoch, iteration)
        compiled = run_step(steps[True], views, boxes, epoch, iteration)
        assert_same_step(eager, compiled)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == graphs, (iteration, dict(counters["stats"]))


def test_compiled_state_dict_keys_are_the_eager_ones():
    steps = [build_step(tiny_args(compiled, False)) for compiled in (False, True)]
    for entry in ("student", "teacher", "udi_loss"):
        keys = [set(step.checkpoint_entries()[entry].state_dict()) for step in steps]
        assert keys[0] == keys[1], entry
