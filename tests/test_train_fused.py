"""Training through the head's last layer fused into the loss (issue 19 §4, "Done when"): `--fuse_last_layer` (the
default) gives the step of the logits path, no [rows, K] tensor appears in a training step, and a checkpoint of the
logits path resumes fused. On the CPU with a tiny ViT."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_train import read_log, tiny_args
from udi import utils
from udi.model import build_model
from udi.step import build_step
from udi.train import TrainingRun, train_one_epoch, train_udi

B, L = 4, 2  # images and local crops of the step's batch (tiny_args' crop sizes)


def make_run(args, dtype=torch.float64) -> TrainingRun:
    """A single-process TrainingRun as train_udi builds it (the objective's step: student, teacher = student, loss;
    fused AdamW, constant schedules), its networks and centers in `dtype`, without autocast."""
    utils.fix_random_seeds(args.seed)
    step = build_step(args)
    for module in step.checkpoint_entries().values():
        module.to(dtype)
    optimizer = torch.optim.AdamW(utils.param_groups(step.student), fused=True)
    steps = 4
    schedules = dict(lr=[1e-3] * steps, wd=[0.04] * steps, momentum=[0.99] * steps)
    return TrainingRun(args, step, optimizer, torch.amp.GradScaler("cpu", enabled=False), schedules,
                       torch.device("cpu"), None, 0, 1)


def one_batch(dtype=torch.float64, seed=0):
    """A loader of one batch: 2 global views [B, 3, 32, 32], L local views [B, 3, 16, 16], boxes [B, 2 + L, 4]."""
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 32, 32, generator=gen, dtype=dtype) for _ in range(2)]
    views += [torch.randn(B, 3, 16, 16, generator=gen, dtype=dtype) for _ in range(L)]
    corner = 0.4 * torch.rand(B, 2 + L, 2, generator=gen)
    boxes = torch.cat([corner, corner + 0.3 + 0.3 * torch.rand(B, 2 + L, 2, generator=gen)], -1)
    return [(views, boxes)]


def step_with_gradients(run: TrainingRun, epoch: int = 1):
    """train_one_epoch over one batch; returns its logged scalars and every student parameter's gradient as the
    optimizer received it."""
    grads, step = {}, run.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in run.step.student.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    run.optimizer.step = recording_step
    return train_one_epoch(run, one_batch(), epoch), grads


# ---- the fused step equals the logits path -------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["udi", "dino"])
@pytest.mark.parametrize("norm_last_layer", ["false", "true"])
def test_a_fused_training_step_equals_the_logits_path(tmp_path, objective, norm_last_layer):
    """Float64, the same initialisation and batch: loss, its parts, the teacher entropies, the gradient of every
    parameter (weight_g and weight_v through the effective weight included), the centers and the parameters after
    the optimizer and the EMA step. Only rounding separates the paths: 1e-9 relative. After the step, parameters
    whose gradient is 0 in exact arithmetic (a bias before a BatchNorm, the attention's key bias) are left out:
    AdamW turns the rounding noise of such a gradient into a step of up to lr."""
    runs = {fuse: make_run(tiny_args(tmp_path, "--objective", objective, "--out_dim", "211", "--norm_last_layer",
                                     norm_last_layer, "--fuse_last_layer", fuse)) for fuse in ("true", "false")}
    (fused_stats, fused_grads), (logit_stats, logit_grads) = (step_with_gradients(run) for run in runs.values())
    assert fused_stats.keys() == logit_stats.keys() and {"loss", "teacher_entropy"} <= fused_stats.keys()
    for key, value in logit_stats.items():
        assert fused_stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    names = [name for name, p in runs["false"].step.student.named_parameters() if p.requires_grad]
    assert sorted(fused_grads) == sorted(logit_grads) == sorted(names)
    assert ("head.last_layer.weight_g" in names) == (norm_last_layer == "false")
    for name, grad in logit_grads.items():
        assert grad.abs().sum() > 0 or "qkv.bias" in name, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    noise = {name for name, grad in logit_grads.items() if grad.abs().max() < 1e-9}
    fused, logits = runs["true"], runs["false"]
    for module, fused_module in fused.step.checkpoint_entries().items():
        for (name, a), (_, b) in zip(fused_module.state_dict().items(),
                                     logits.step.checkpoint_entries()[module].state_dict().items()):
            if name not in noise:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{module}.{name}")


@pytest.mark.parametrize("objective", ["udi", "dino"])
def test_a_fused_bf16_autocast_step_is_close_to_the_logits_path(tmp_path, objective):
    """Under bf16 autocast (--precision bf16; on the CPU here) the rows and weights enter the op in bf16 as the last
    layer's F.linear takes them, the op accumulates in float32 while the logits path rounds its logits to bf16
    (relative 2^-9): the losses agree to 5e-3 relative, the teacher entropy (from those logits over τt = 0.04, an
    error of up to ~0.1 in u; the fused diagnostics run in float32) to 2e-2."""
    stats = {}
    for fuse in ("true", "false"):
        run = make_run(tiny_args(tmp_path, "--objective", objective, "--out_dim", "211", "--fuse_last_layer", fuse),
                       torch.float32)
        run.dtype = torch.bfloat16
        stats[fuse] = train_one_epoch(run, one_batch(torch.float32), epoch=1)
    for key, tolerance in (("loss", 5e-3), ("cls", 5e-3), ("cls_plus", 5e-3), ("patch", 5e-3),
                           ("teacher_entropy", 2e-2)):
        if key in stats["false"]:
            assert stats["true"][key] == pytest.approx(stats["false"][key], rel=tolerance), key


def test_freeze_last_layer_cancels_the_fused_last_layer_gradients(tmp_path):
    """--freeze_last_layer 2, epoch 1: weight_g and weight_v get their gradients through the effective weight and
    lose them before the optimizer, as on the logits path; every other parameter keeps its gradient."""
    run = make_run(tiny_args(tmp_path, "--out_dim", "211", "--freeze_last_layer", "2"))
    before = {name: p.detach().clone() for name, p in run.step.student.named_parameters()}
    _, grads = step_with_gradients(run, epoch=1)
    names = {name for name, p in run.step.student.named_parameters() if p.requires_grad}
    assert set(grads) == {name for name in names if "last_layer" not in name}
    for name, p in run.step.student.named_parameters():
        assert torch.equal(p, before[name]) == ("last_layer" in name), name


# ---- no [rows, K] tensor in a training step ------------------------------------------------------------------------

OUT_DIM, BOTTLENECK = 4111, 18  # K: prime, above every chunk size, equal to no other size of the step


class KWideOutputs(TorchDispatchMode):
    """Records every op output with a dimension of size K = OUT_DIM that holds more than `centers` rows of K
    (rows = numel / K), except the last layer's [K, D] and [D, K] weight tensors (its parameters, their gradients
    and optimizer states, transposed views)."""

    def __init__(self, centers: int):
        super().__init__()
        self.centers, self.found = centers, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and OUT_DIM in tensor.shape and \
                    tuple(tensor.shape) not in ((OUT_DIM, BOTTLENECK), (BOTTLENECK, OUT_DIM)) and \
                    tensor.numel() // OUT_DIM > self.centers:
                self.found.append(f"{func}: {list(tensor.shape)}")
        return out


def watched_step(tmp_path, objective: str, fuse: str):
    args = tiny_args(tmp_path, "--objective", objective, "--out_dim", str(OUT_DIM), "--head_bottleneck_dim",
                     str(BOTTLENECK), "--fuse_last_layer", fuse)
    run = make_run(args, torch.float32)
    centers = 3 if objective == "udi" else 1
    loader = [(views, boxes) for views, boxes in one_batch(torch.float32)]
    with KWideOutputs(centers) as watch:  # forward, backward, clipping, optimizer, EMA, diagnostics
        stats = train_one_epoch(run, loader, epoch=1)
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["teacher_entropy"])
    return watch.found


@pytest.mark.parametrize("objective", ["udi", "dino"])
def test_the_logits_path_forms_k_wide_tensors(tmp_path, objective):
    """The watch sees [rows, K] logits: the check below can fail."""
    found = watched_step(tmp_path, objective, "false")
    assert any(f"{B * (2 + L)}, {OUT_DIM}]" in line for line in found), found


@pytest.mark.parametrize("objective", ["udi", "dino"])
def test_a_fused_training_step_forms_no_k_wide_tensor(tmp_path, objective):
    assert watched_step(tmp_path, objective, "true") == []


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_a_checkpoint_of_the_logits_path_resumes_fused(tmp_path):
    """Same parameters and state-dict keys either way: a run of the logits path (as every checkpoint before issue
    19) killed after epoch 0 resumes with the fused path and follows the straight logits run to rounding."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    logits = ("--fuse_last_layer", "false")
    _, teacher = train_udi(tiny_args(straight, *logits))
    train_udi(tiny_args(resumed, *logits), stop_after_epoch=0)
    written = torch.load(resumed / "checkpoint.pth", weights_only=False)
    _, teacher_resumed = train_udi(tiny_args(resumed))
    assert torch.load(resumed / "checkpoint.pth", weights_only=False)["epoch"] == 2
    for name in ("student", "teacher"):
        assert list(written[name]) == list(build_model(tiny_args(resumed)).state_dict())
    assert set(written["udi_loss"]) == {"center_cls.center", "center_cls_plus.center", "center_patch.center"}
    for a, b in zip(read_log(straight), read_log(resumed)):
        assert a.keys() == b.keys() and a["epoch"] == b["epoch"]
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(teacher.state_dict().items(), teacher_resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
