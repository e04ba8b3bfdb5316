"""Gradient accumulation (issue 23 §3, `--accum_iter`): B images in one optimizer step equal B/2 images in 2
micro-batches, for the losses under udi_kernels.losses.defer_center_updates and for udi.train's step (loss,
gradients, centers, student and teacher weights), and the centers, schedules and optimizer advance once per
optimizer step. On the CPU, float32.

Tolerances (float32): centers and losses 2e-6 relative / 1e-6 absolute (sums of the same rows in another order);
the training step's gradients and weights rtol 1e-4, atol 1e-5, as tests/test_train.py's DDP test (reductions in
another order through a ViT).
"""
import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from test_train import NO_HEAD_BATCHNORM, _free_port, read_log, tiny_args
from test_train_fused import make_run, one_batch
from udi.step import TrainingStep, sample_pairs
from udi.train import optimizer_steps, train_one_epoch, train_udi
from udi_kernels.compat import lightly as compat_lightly
from udi_kernels.compat import udi_loss as compat_udi
from udi_kernels.layout import UDIStudent, UDITeacher
from udi_kernels.losses import DINOLoss, EMACenter, IBOTPatchLoss, UDILoss, centering, defer_center_updates
from udi_kernels.testing.losses import random_udi_inputs

B, L, K = 4, 2, 16
CLOSE = dict(rtol=2e-6, atol=1e-6)


def half(rows: torch.Tensor, crops: int, part: int) -> torch.Tensor:
    """Images [part·B/2, (part+1)·B/2) of every crop of crop-major rows [crops·B, ...]."""
    return rows.unflatten(0, (crops, -1)).chunk(2, dim=1)[part].flatten(0, 1)


def centers_of(loss) -> list:
    return [m.center.clone() for m in loss.modules() if isinstance(m, EMACenter)]


# ---- each loss: two deferred calls equal one call of all the rows ---------------------------------------------------

def dino_calls(part=None):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn((2 + L) * B, K, generator=gen), torch.randn(2 * B, K, generator=gen)
    if part is not None:
        student, teacher = half(student, 2 + L, part), half(teacher, 2, part)
    return lambda loss: loss(student, teacher, 1)


def ibot_calls(part=None):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2 * B, 5, K, generator=gen), torch.randn(2 * B, 5, K, generator=gen)
    mask = torch.rand(2 * B, 5, generator=gen) < 0.6
    if part is not None:
        student, teacher, mask = (half(x, 2, part) for x in (student, teacher, mask))
    return lambda loss: loss(student, teacher, mask, 1)


def udi_calls(part=None):
    student, teacher = random_udi_inputs(B, L, K, 4, 3, seed=2)
    if part is not None:
        student, teacher = split_inputs(student, teacher, part)
    return lambda loss: loss(student, teacher, 1)[0]


def split_inputs(student, teacher, part):
    return (UDIStudent(half(student.cls, 2 + L, part), half(student.cls_plus, 2 + L, part),
                       half(student.patch, 2, part)),
            UDITeacher(half(teacher.cls, 2, part), half(teacher.patch, 2, part), half(teacher.patch_mask, 2, part),
                       half(teacher.local, 2 * L, part), half(teacher.local_mask, 2 * L, part)))


def lightly_calls(part=None):
    gen = torch.Generator().manual_seed(3)
    teacher, student = [torch.randn(B, K, generator=gen) for _ in range(2)], [torch.randn(B, K, generator=gen)
                                                                                for _ in range(2 + L)]
    if part is not None:
        teacher, student = [v.chunk(2)[part] for v in teacher], [v.chunk(2)[part] for v in student]
    return lambda loss: loss(teacher, student, epoch=1)


LOSSES = {
    "dino": (lambda: DINOLoss(K, 2 + L, 0.04, 0.07, 2, 10), dino_calls),
    "ibot": (lambda: IBOTPatchLoss(K, 0.04, 0.07, 2, 10), ibot_calls),
    "udi": (lambda: UDILoss(K, 2 + L), udi_calls),
    "lightly": (lambda: compat_lightly.DINOLoss(K, center_mean="per_rank"), lightly_calls),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_deferred_centers_take_one_step_from_the_mean_of_all_calls(name):
    """Inside defer_center_updates the centers keep their values (the second call's targets use the centers from
    before the step); at the end they equal the centers one call of all the rows gives, which the naive update
    (one EMA step per call) does not."""
    build, calls = LOSSES[name]
    torch.manual_seed(0)
    full = build()
    for center in (m for m in full.modules() if isinstance(m, EMACenter)):
        center.center.normal_()
    deferred, naive = copy.deepcopy(full), copy.deepcopy(full)
    before = centers_of(full)
    calls()(full)
    with defer_center_updates(deferred):
        calls(0)(deferred)
        assert all(torch.equal(a, b) for a, b in zip(centers_of(deferred), before))
        calls(1)(deferred)
    calls(0)(naive), calls(1)(naive)
    for got, expected, stepwise in zip(centers_of(deferred), centers_of(full), centers_of(naive)):
        torch.testing.assert_close(got, expected, **CLOSE)
        assert not torch.allclose(stepwise, expected, **CLOSE)  # the test can fail


def test_deferred_udi_loss_and_gradients_equal_the_whole_batch():
    """UDILoss: with patch_count the mean valid count of the two calls, the mean of their losses (and of each part)
    and their summed gradients (each loss / 2) equal the whole batch's; without it each call's L_patch is over its
    own valid samples, which differs."""
    student, teacher = random_udi_inputs(B, L, K, 4, 3, seed=2)
    full, deferred = UDILoss(K, 2 + L), UDILoss(K, 2 + L)
    loss, parts = full(student, teacher, 1)
    grad_full = torch.autograd.grad(loss, list(student))
    patch_count = teacher.patch_mask.sum() / 2
    with defer_center_updates(deferred):
        results = [deferred(*split_inputs(student, teacher, part), 1, patch_count=patch_count) for part in (0, 1)]
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, loss, **CLOSE)
    for key in parts:
        torch.testing.assert_close((results[0][1][key] + results[1][1][key]) / 2, parts[key], **CLOSE)
    grad_halves = torch.autograd.grad(sum(r[0] / 2 for r in results), list(student))
    for got, expected in zip(grad_halves, grad_full):
        torch.testing.assert_close(got, expected, **CLOSE)
    for got, expected in zip(centers_of(deferred), centers_of(full)):
        torch.testing.assert_close(got, expected, **CLOSE)
    own = [deferred(*split_inputs(student, teacher, part), 1)[1]["patch"] for part in (0, 1)]
    assert not torch.allclose((own[0] + own[1]) / 2, parts["patch"], **CLOSE)  # patch_count matters here


@pytest.mark.parametrize("value, error", [(0.0, ValueError), (float("nan"), ValueError), (torch.ones(1), ValueError),
                                          ("2", TypeError)])
def test_a_bad_patch_count_is_named(value, error):
    student, teacher = random_udi_inputs(B, L, K, 4, 3, seed=2)
    with pytest.raises(error, match="patch_count"):
        UDILoss(K, 2 + L)(student, teacher, 1, patch_count=value)


def test_compat_udi_loss_defers_its_centers():
    """The reference's UDILoss drop-in holds an EMACenter too (`centering`, state keys unchanged)."""
    loss = compat_udi.UDILoss(2, K, [0.04] * 3)
    assert isinstance(loss.centering, EMACenter)
    assert set(loss.state_dict()) == {"centering.center", "centering.count"}
    for loss, shape in ((DINOLoss(K, 2 + L, 0.04, 0.07, 2, 10), (1, K)), (compat_lightly.DINOLoss(K), (1, 1, K))):
        saved = {"center": torch.randn(shape)}  # DINO's main_dino.py's / lightly's key
        loss.load_state_dict(saved)  # strict
        assert torch.equal(loss.center, saved["center"]) and list(loss.state_dict()) == ["center"]
        assert torch.equal(loss.state_dict()["center"], saved["center"])


def test_an_exception_inside_the_context_discards_the_statistics_and_nesting_is_refused():
    loss = DINOLoss(K, 2 + L, 0.04, 0.07, 2, 10)
    with pytest.raises(KeyError):
        with defer_center_updates(loss):
            dino_calls(0)(loss)
            raise KeyError
    assert not loss.center.any() and loss.centering_ema.deferred is None
    with pytest.raises(RuntimeError, match="already deferred"):
        with defer_center_updates(loss), defer_center_updates(loss):
            pass
    dino_calls()(loss)
    assert loss.center.any()  # updates at once again


# ---- udi.train: one optimizer step of B images equals --accum_iter 2 of B/2 ----------------------------------------

def micro_batches(batch, parts: int):
    views, boxes = batch
    return [([v.chunk(parts)[i] for v in views], boxes.chunk(parts)[i]) for i in range(parts)]


def one_step(tmp_path, objective, accum_iter):
    """One optimizer step of train_one_epoch on one_batch's 4 images; returns its logged scalars, the gradients
    the optimizer received and the checkpoint entries after the step."""
    args = tiny_args(tmp_path, *NO_HEAD_BATCHNORM, "--objective", objective, "--accum_iter", str(accum_iter),
                     "--batch_size_per_gpu", str(B // accum_iter))
    run = make_run(args, torch.float32)
    grads, step = {}, run.optimizer.step

    def recording_step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in run.step.student.named_parameters() if p.grad is not None})
        return step(*a, **k)
    run.optimizer.step = recording_step
    stats = train_one_epoch(run, micro_batches(one_batch(torch.float32)[0], accum_iter), epoch=1)
    return stats, grads, {k: v.state_dict() for k, v in run.step.checkpoint_entries().items()}


@pytest.mark.parametrize("objective", ["udi", "dino"])
def test_accumulated_step_equals_the_whole_batch(tmp_path, objective):
    """Deterministic: no BatchNorm in the head (its statistics are per call), drop_path 0 (tiny_args' demo preset),
    float32, the same initialisation and images. Loss and its logged parts, the teacher entropy, every gradient,
    every center, the student's and the teacher's weights after the step."""
    stats1, grads1, state1 = one_step(tmp_path / "one", objective, 1)
    stats2, grads2, state2 = one_step(tmp_path / "two", objective, 2)
    assert stats2.keys() == stats1.keys()
    # teacher_batch_entropy is the entropy of each micro-batch's mean target, as of each process's under DDP
    for key in stats1.keys() - {"teacher_batch_entropy"}:
        assert stats2[key] == pytest.approx(stats1[key], rel=1e-5, abs=1e-6), key
    assert grads2.keys() == grads1.keys() and grads1
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=1e-5, msg=name)
    for entry in state1:
        for name, value in state1[entry].items():
            if name.endswith("qkv.bias"):  # the key bias: zero gradient, AdamW's step of rounding noise
                C = value.shape[0] // 3
                value, other = torch.cat([value[:C], value[2 * C:]]), state2[entry][name]
                other = torch.cat([other[:C], other[2 * C:]])
            else:
                other = state2[entry][name]
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"{entry}.{name}")


def test_centers_schedules_optimizer_and_teacher_advance_once_per_optimizer_step(tmp_path, monkeypatch):
    """5 micro-batches with --accum_iter 2: 2 optimizer steps (the fifth batch is dropped), 2 EMA steps of the
    centers (one batched update of the three UDI centers each), 2 teacher updates, the schedules' steps 2 and 3."""
    args = tiny_args(tmp_path, "--accum_iter", "2", "--batch_size_per_gpu", "2")
    run = make_run(args, torch.float32)
    run.schedules["lr"] = [1.0, 2.0, 3e-4, 4e-4]
    counts = dict(optimizer=0, centers=0, teacher=0, lr=[])
    step, update_teacher, report = run.optimizer.step, run.step.update_teacher, centering._skipped_updates.report

    def counted(key, function):
        def call(*a, **k):
            counts[key] += 1
            if key == "optimizer":
                counts["lr"].append(run.optimizer.param_groups[0]["lr"])
            return function(*a, **k)
        return call
    run.optimizer.step = counted("optimizer", step)
    run.step.update_teacher = counted("teacher", update_teacher)
    monkeypatch.setattr(centering._skipped_updates, "report", counted("centers", report))
    batches = micro_batches(one_batch(torch.float32)[0], 2) * 2 + micro_batches(one_batch(torch.float32)[0], 2)[:1]
    assert optimizer_steps(batches, args) == 2
    train_one_epoch(run, batches, epoch=1)
    assert counts == dict(optimizer=2, centers=2, teacher=2, lr=[3e-4, 4e-4])


def test_micro_batches_and_ranks_draw_as_the_whole_batch_would():
    """Image b of micro-batch m on rank r draws its SRS pairs as image (m·W + r)·b of the step's global batch,
    where ShardedBatchSampler puts it."""
    args = tiny_args("unused")
    boxes = one_batch(torch.float32)[0][1].repeat(2, 1, 1)  # 8 images
    whole = sample_pairs(boxes, args, seed=7)
    W, b = 2, 2
    for m in range(2):
        for r in range(W):
            rows = slice((m * W + r) * b, (m * W + r + 1) * b)
            part = sample_pairs(boxes[rows], args, 7, r, m, W)
            for got, expected in zip(torch.utils._pytree.tree_leaves(part), torch.utils._pytree.tree_leaves(whole)):
                assert torch.equal(got, expected[rows])


# ---- the command line and a run ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--accum_iter", "0"], "argument --accum_iter: expected an int in [1, 4096], got 0"),
    (["--accum_iter", "3", "--embedded_images", "8", "--batch_size_per_gpu", "4"],
     "--embedded_images 8 give no full batch of --batch_size_per_gpu 4 x 1 process(es) x --accum_iter 3"),
])
def test_accum_iter_is_checked_when_parsed(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        tiny_args(tmp_path, *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_run_with_accum_iter_trains_and_resumes_exactly(tmp_path, capsys):
    """The demo preset on 16 embedded digits, 2 x 2 images per optimizer step (4 steps an epoch): it completes,
    and a run stopped after epoch 0 resumes to the same log and teacher bit for bit."""
    flags = ("--embedded_data", "digits", "--embedded_images", "16", "--batch_size_per_gpu", "2", "--accum_iter", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _, teacher = train_udi(tiny_args(straight, *flags))
    assert "4 steps of 2 x 1 x 2 (--accum_iter) images per epoch" in capsys.readouterr().out
    train_udi(tiny_args(resumed, *flags), stop_after_epoch=0)
    _, teacher_resumed = train_udi(tiny_args(resumed, *flags))
    log = read_log(straight)
    assert len(log) == 2 and log == read_log(resumed)
    for a, b in zip(teacher.state_dict().values(), teacher_resumed.state_dict().values()):
        assert torch.equal(a, b)
    checkpoint = torch.load(straight / "checkpoint.pth", weights_only=False)
    assert checkpoint["args"]["accum_iter"] == 2 and checkpoint["optimizer"]["state"][0]["step"] == 8


# ---- DDP: one all-reduce per optimizer step ------------------------------------------------------------------------

def _ddp_accumulating_worker(rank, world_size, port, output_dir):
    """A DINO run of 2 processes x 2 micro-batches of 2 images, recording each DDP all-reduce's bucket index."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    buckets, build = [], TrainingStep.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)

        def counting_hook(state, bucket):
            buckets.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)
        self.student_ddp.register_comm_hook(None, counting_hook)
    TrainingStep.__init__ = init
    train_udi(tiny_args(output_dir, *NO_HEAD_BATCHNORM, "--objective", "dino", "--batch_size_per_gpu", "2",
                        "--accum_iter", "2", "--epochs", "1"))
    torch.distributed.destroy_process_group()
    with open(os.path.join(output_dir, f"buckets{rank}.json"), "w") as f:
        json.dump(buckets, f)


def test_two_processes_accumulating_equal_one_process_with_the_whole_batch(tmp_path):
    """2 processes x --accum_iter 2 x 2 images equal 1 process x 8 images (the DINO objective, one optimizer step;
    tolerances as tests/test_train.py's DDP test), and DDP all-reduces the gradients once, in the last
    micro-batch's backward (no_sync before)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_udi(tiny_args(single, *NO_HEAD_BATCHNORM, "--objective", "dino", "--batch_size_per_gpu", "8",
                        "--epochs", "1"))
    mp.spawn(_ddp_accumulating_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    one, two = (torch.load(d / "checkpoint.pth", weights_only=False) for d in (single, ddp))
    for key in ("student", "teacher", "dino_loss"):
        for name, value in one[key].items():
            other = two[key][name]
            if name.endswith("qkv.bias"):  # the key bias: zero gradient, AdamW's step of rounding noise
                C = value.shape[0] // 3
                value, other = torch.cat([value[:C], value[2 * C:]]), torch.cat([other[:C], other[2 * C:]])
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    assert read_log(single)[0]["train_loss"] == pytest.approx(read_log(ddp)[0]["train_loss"], rel=1e-5)
    for rank in range(2):
        with open(ddp / f"buckets{rank}.json") as f:
            assert json.load(f).count(0) == 1  # bucket 0 reduced once: one synced backward in the step
