"""The UDI training loop (issue 5 §6): data boxes, bottleneck-space targets, checkpoint conversion, short runs,
exact resume and 2-process DDP, all on the CPU with a tiny ViT."""
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from udi import eval_linear, utils
from udi.data import Crop, MultiCropAugmentation, crop_box
from udi.eval_knn import knn_classify
from udi.model import DINOHead, UDIModel, ViTBackbone, build_model, split_last_layer
from udi.step import sample_pairs, udi_teacher_targets
from udi.train import TIMING_FIELDS, parse_args, train_udi
from udi_kernels import PairTaps
from udi_kernels.layout import UDITeacher, student_taps
from udi_kernels.losses import UDILoss, cls_plus_targets, teacher_entropies
from udi_kernels.ops.distill_cross_entropy import DistillCrossEntropyResult

TINY = ["--preset", "demo", "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--patch_size", "8",
        "--global_crop_size", "32", "--local_crop_size", "16", "--global_window", "2", "--local_window", "1",
        "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
        "--batch_size_per_gpu", "4", "--embedded_data", "images", "--embedded_images", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1", "--final_eval", "false"]


# without BatchNorm in the head: its statistics are per process without SyncBatchNorm (CUDA only), and a sharp teacher's
# loss falls within a few steps only without it
NO_HEAD_BATCHNORM = ("--use_bn_in_head", "false")


def tiny_args(output_dir, *extra):
    return parse_args(TINY + ["--output_dir", str(output_dir), *extra])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    backbone = ViTBackbone("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.0, embed_dim=32, depth=1,
                           num_heads=2)
    return UDIModel(backbone, DINOHead(32, 64, norm_last_layer=False, hidden_dim=32, bottleneck_dim=16))


def read_log(output_dir, timing=False):
    """log.txt's records; without `timing` less the fields that differ from run to run (udi.train.TIMING_FIELDS)."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        records = [json.loads(line) for line in f]
    return records if timing else [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


# ---- data ------------------------------------------------------------------------------------------------

def test_crop_box_is_the_signed_ij_box():
    box = crop_box(Crop(top=10, left=20, height=31, width=41), (101, 201), flipped=False)
    assert box == pytest.approx([0.1, 0.1, 0.4, 0.3])
    flipped = crop_box(Crop(top=10, left=20, height=31, width=41), (101, 201), flipped=True)
    assert flipped == pytest.approx([0.1, 0.3, 0.4, 0.1])


def _overlap(a, b):
    lo = torch.maximum(torch.minimum(a[:2], a[2:]), torch.minimum(b[:2], b[2:]))
    hi = torch.minimum(torch.maximum(a[:2], a[2:]), torch.maximum(b[:2], b[2:]))
    return bool((lo <= hi).all())


def test_multicrop_views_boxes_and_crop_rules():
    augmentation = MultiCropAugmentation((0.05, 0.3), (0.01, 0.05), 6, global_size=24, local_size=12)
    image = torch.rand(3, 97, 131)
    flips = 0
    for seed in range(20):
        views, boxes = augmentation(image, torch.Generator().manual_seed(seed))
        assert [v.shape for v in views] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 6
        assert all(torch.isfinite(v).all() for v in views)
        assert boxes.shape == (8, 4) and boxes.dtype == torch.float32
        assert bool(((boxes >= 0) & (boxes <= 1)).all()) and bool((boxes[:, 0] < boxes[:, 2]).all())
        flips += int((boxes[:, 1] > boxes[:, 3]).sum())
        assert _overlap(boxes[0], boxes[1]), "global crop 1 must overlap global crop 0"
        union = torch.cat([torch.minimum(boxes[:2, :2].min(0).values, boxes[:2, 2:].min(0).values),
                           torch.maximum(boxes[:2, :2].max(0).values, boxes[:2, 2:].max(0).values)])
        assert all(_overlap(b, union) for b in boxes[2:]), "locals must overlap the globals' bounding box"
    assert 0 < flips < 160, "about half of the crops are flipped"


def test_blur_sigma_scales_with_the_global_crop_size(monkeypatch):
    """DINO's blur sigmas (0.1-2 px) belong to 224-px crops: a 32-px demo crop gets them times 32/224."""
    from udi.data import augmentation as data
    sigmas = []
    blur = data.separable_gaussian_blur
    monkeypatch.setattr(data, "separable_gaussian_blur", lambda image, kernel, sigma: sigmas.append(sigma) or
                        blur(image, kernel, sigma))
    image = torch.rand(3, 64, 64)
    for size, (low, high) in ((224, (0.1, 2.0)), (32, (0.1 * 32 / 224, 2.0 * 32 / 224))):
        sigmas.clear()
        augmentation = MultiCropAugmentation((0.25, 1.0), (0.05, 0.25), 2, global_size=size, local_size=size // 2)
        for seed in range(30):
            augmentation(image, torch.Generator().manual_seed(seed))
        assert len(sigmas) >= 30 and low <= min(sigmas) and max(sigmas) <= high, (size, min(sigmas), max(sigmas))
        assert max(sigmas) > low + 0.8 * (high - low), "the whole range is used"


def test_hue_shift_skipped_on_grey_views_changes_no_bit(monkeypatch):
    from udi.data import augmentation as data
    grey = (1.2 * torch.rand(1, 24, 24) - 0.1).expand(3, -1, -1).contiguous()  # a resize may leave [0, 1]
    colour = torch.rand(3, 24, 24)
    assert not data.is_grey(colour) and data.is_grey(grey)
    skipped = [data.color_jitter(data.RandomDraws(data.image_generator(0, i)), grey) for i in range(40)]
    monkeypatch.setattr(data, "is_grey", lambda image: False)  # always shift the hue
    shifted = [data.color_jitter(data.RandomDraws(data.image_generator(0, i)), grey) for i in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(skipped, shifted))


def test_separable_blur_equals_torchvision():
    from udi.data import augmentation as data
    gen = torch.Generator().manual_seed(0)
    for size, sigma in ((32, 0.02), (32, 0.29), (16, 0.2), (7, 1.5), (60, 2.0)):
        image = torch.rand(3, size, size + 3, generator=gen)
        kernel = min(2 * math.ceil(3 * sigma) + 1, (size - 1) | 1)
        expected = data.TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        torch.testing.assert_close(data.separable_gaussian_blur(image, kernel, sigma), expected, rtol=0, atol=1e-6)
    for kernel, sigma in ((4, 1.0), (0, 1.0), (3, 0.0), (3, -1.0)):
        with pytest.raises(ValueError, match="kernel" if kernel % 2 == 0 else "sigma"):
            data.separable_gaussian_blur(torch.rand(3, 8, 8), kernel, sigma)


def test_resized_crop_equals_torchvision_bit_for_bit():
    from udi.data import augmentation as data
    image = torch.rand(3, 40, 36)
    for crop, size in ((data.Crop(3, 5, 20, 22), 32), (data.Crop(0, 0, 40, 36), 16), (data.Crop(10, 2, 3, 4), 16)):
        assert torch.equal(data.resized_crop(image, crop, size),
                           data.TF.resized_crop(image, *crop, size=[size, size], antialias=True))


def test_random_draws_cover_their_ranges():
    from udi.data import RandomDraws
    rng = RandomDraws(torch.Generator().manual_seed(0))
    ints = [rng.randint(2, 5) for _ in range(400)]  # more than one buffer of draws
    assert set(ints) == {2, 3, 4, 5}
    floats = [rng.uniform(-1.0, 3.0) for _ in range(400)]
    assert -1.0 <= min(floats) < -0.9 and 2.9 < max(floats) < 3.0
    perms = {tuple(rng.permutation(4)) for _ in range(400)}
    assert all(sorted(p) == [0, 1, 2, 3] for p in perms) and len(perms) == 24
    again = RandomDraws(torch.Generator().manual_seed(0))
    assert [again.randint(2, 5) for _ in range(400)] == ints
    with pytest.raises(ValueError, match="low <= high"):
        rng.randint(3, 2)


def test_freeze_last_layer_cancels_only_its_gradients_in_its_epochs():
    from udi.utils import cancel_gradients_last_layer
    model = tiny_model()
    for epoch, frozen in ((0, True), (1, True), (2, False)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        cancel_gradients_last_layer(epoch, model, freeze_last_layer=2)
        for name, p in model.named_parameters():
            assert (p.grad is None) == (frozen and "last_layer" in name), (epoch, name)


def test_clip_gradients_scales_each_parameter_by_its_own_norm():
    from udi.utils import clip_gradients
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = None if i == 3 else torch.randn(p.shape, generator=gen) * (0.01 if i % 2 else 10.0)
    expected = [None if p.grad is None else
                p.grad.double() * min(1.0, 3.0 / (p.grad.double().norm().item() + 1e-6)) for p in params]
    clip_gradients(model, 3.0)
    for p, e in zip(params, expected):
        assert (p.grad is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-9)
    assert any(e is not None and e.norm() < 1 for e in expected) and params[0].grad.norm() <= 3.0 + 1e-5


def test_views_depend_only_on_seed_epoch_index():
    from udi.data import EpochIndex, pretraining_dataset
    dataset = pretraining_dataset(None, MultiCropAugmentation(local_crops_number=2, global_size=32, local_size=16),
                                  seed=3, embedded_length=4)
    first, again, other_epoch = dataset[EpochIndex(0, 2)], dataset[EpochIndex(0, 2)], dataset[EpochIndex(1, 2)]
    assert torch.equal(first[1], again[1]) and torch.equal(first[0][0], again[0][0])
    assert not torch.equal(first[1], other_epoch[1])
    with pytest.raises(TypeError, match="EpochIndex"):
        dataset[2]


# ---- model ---------------------------------------------------------------------------------------------

def test_bottleneck_targets_equal_logit_space():
    """Targets formed in the bottleneck == every sample taken to K logits and blended there, as UDILoss does
    for a UDITeacher (udi_kernels.losses.cls_plus_targets); float64, so only rounding separates them."""
    torch.manual_seed(0)
    B, L, Sg, Sl, D, K = 3, 2, 5, 4, 16, 97
    head = DINOHead(8, K, hidden_dim=8, bottleneck_dim=D).double()
    head.last_layer.weight_g.data.uniform_(0.5, 2.0)
    z_cls = F.normalize(torch.randn(2 * B, D, dtype=torch.float64), dim=-1)
    z_global = F.normalize(torch.randn(2 * B, Sg, D, dtype=torch.float64), dim=-1)
    z_local = F.normalize(torch.randn(2 * L * B, Sl, D, dtype=torch.float64), dim=-1)
    mask_global = torch.rand(2 * B, Sg) < 0.6
    mask_global[0] = False  # an image whose pair has no valid sample
    mask_local = torch.rand(2 * L * B, Sl) < 0.6
    got = cls_plus_targets(UDITeacher(z_cls, z_global, mask_global, z_local, mask_local), alpha=0.5,
                           last_layer=head.last_layer)
    W = head.last_layer.weight.detach()
    want = cls_plus_targets(UDITeacher(z_cls @ W.t(), z_global @ W.t(), mask_global, z_local @ W.t(), mask_local),
                            alpha=0.5)
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-10, msg=name)


def _pairs(B=3, L=2, seed=5):
    boxes = torch.tensor([[0.1, 0.2, 0.8, 0.9], [0.3, 0.7, 0.95, 0.05]] + [[0.2, 0.1, 0.6, 0.5]] * L)
    boxes = boxes.expand(B, -1, -1).contiguous()
    args = tiny_args("/tmp/unused", "--local_crops_number", str(L))
    return sample_pairs(boxes, args, seed)


def test_teacher_targets_match_a_per_pair_computation():
    model = tiny_model().double().eval()
    B, L, alpha = 3, 2, 0.5
    pairs = _pairs(B, L)
    crops = torch.randn(2 * B, 3, 32, 32, dtype=torch.float64)
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    targets = udi_teacher_targets(model, crops, pairs, alpha)
    assert len(calls) == 1, "the teacher runs its backbone once per step"
    out = model.backbone(crops)
    patch, cls = out.patch.unflatten(0, (2, B)), model.head(out.cls).unflatten(0, (2, B))
    torch.testing.assert_close(targets.cls, cls.flatten(0, 1))

    def sample_logits(crop, taps, pair):  # teacher crop `crop` at the target taps of `pair` -> logits, mask
        z = model.head.bottleneck(model.srs(patch[crop], taps.tgt_index[..., pair, :, :],
                                            taps.tgt_weight[..., pair, :, :].double()))
        return model.head.last_layer(z), torch.arange(z.shape[1]) < taps.count[..., pair, None]

    def blend(logits, mask, base):
        m = mask.double()[..., None]
        return alpha * (logits * m).sum(1) / (m.sum(1) + 1e-5) + (1 - alpha) * base

    for v in range(2):  # student global v, answered by teacher crop 1 - v
        logits, mask = sample_logits(1 - v, pairs.globals, v)
        rows = slice(v * B, (v + 1) * B)
        assert torch.equal(targets.patch_mask[rows], mask)
        torch.testing.assert_close(targets.patch[rows][mask], logits[mask])
        torch.testing.assert_close(targets.cls_plus[rows], blend(logits, mask, cls[1 - v]))
    local_sum = 0
    for l in range(L):
        for g in range(2):  # pair p = 1 - g of local crop l targets teacher crop g
            logits, mask = sample_logits(g, PairTaps(*(t[:, l] for t in pairs.locals)), 1 - g)
            rows = slice(2 * B + (2 * l + g) * B, 2 * B + (2 * l + g + 1) * B)
            torch.testing.assert_close(targets.cls_plus[rows], blend(logits, mask, cls[g]))
            local_sum = local_sum + logits[mask].sum(0)
    torch.testing.assert_close(targets.extra_patch_sum, local_sum)
    assert targets.extra_patch_count == pairs.locals.count.sum()


def test_teacher_targets_without_local_crops():
    """--local_crops_number 0 (DINO's 2-crop setting): the teacher's taps and local rows are empty, not a reshape
    error, and the targets are those of the global crops alone."""
    model = tiny_model().eval()
    B = 3
    pairs = _pairs(B, L=0)
    crops = torch.randn(2 * B, 3, 32, 32)
    targets = udi_teacher_targets(model, crops, pairs, 0.5)
    assert targets.cls_plus.shape == (2 * B, 64) and targets.patch.shape == (2 * B, 4, 64)
    assert targets.extra_patch_count == 0 and not targets.extra_patch_sum.any()
    with_locals = udi_teacher_targets(model, crops, _pairs(B, L=2), 0.5)
    torch.testing.assert_close(targets.cls_plus, with_locals.cls_plus[:2 * B])
    torch.testing.assert_close(targets.patch, with_locals.patch)
    student = model(crops, None, student_taps(pairs))
    loss, parts = UDILoss(64, 2)(student, targets, 0)
    assert torch.isfinite(loss)


def test_short_run_without_local_crops(tmp_path):
    train_udi(tiny_args(tmp_path, "--local_crops_number", "0", "--epochs", "1"))
    assert np.isfinite(read_log(tmp_path)[0]["train_loss"])


def test_student_output_shapes_and_gradients():
    model = tiny_model()
    B, L = 3, 2
    pairs = _pairs(B, L)
    out = model(torch.randn(2 * B, 3, 32, 32), torch.randn(L * B, 3, 16, 16), student_taps(pairs))
    assert out.cls.shape == ((2 + L) * B, 64) and out.cls_plus.shape == ((2 + L) * B, 64)
    assert out.patch.shape == (2 * B, 4, 64)
    (out.cls.sum() + out.cls_plus.sum() + out.patch.sum()).backward()
    assert model.backbone.cls_token.grad[0, 1].abs().sum() > 0 and model.srs.attn.qkv.weight.grad.abs().sum() > 0


def _head_float64(head: DINOHead, rows: torch.Tensor) -> torch.Tensor:
    """DINO's head with BatchNorm in training mode, written out in float64: [n, C] -> [n, K]."""
    x = rows.double()
    for index in (0, 3):
        linear, norm = head.mlp[index], head.mlp[index + 1]
        x = x @ linear.weight.double().T + linear.bias.double()
        x = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + norm.eps)
        x = x * norm.weight.double() + norm.bias.double()
        x = torch.nn.functional.gelu(x)
    x = torch.nn.functional.normalize(x @ head.mlp[6].weight.double().T + head.mlp[6].bias.double(), dim=-1)
    v = head.last_layer.weight_v.double()
    return x @ (head.last_layer.weight_g.double() * v / v.norm(dim=1, keepdim=True)).T


def test_head_batchnorm_has_the_reference_layout_and_normalises_over_each_call():
    torch.manual_seed(0)
    model = UDIModel(tiny_model().backbone, DINOHead(32, 64, norm_last_layer=False, hidden_dim=32, bottleneck_dim=16,
                                                     use_bn=True))
    assert [type(m).__name__ for m in model.head.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d",
                                                          "GELU", "Linear"]  # the reference's mlp.0-6 with use_bn
    for norm in (model.head.mlp[1], model.head.mlp[4]):  # away from the identity, so a wrong statistic shows
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    B, L = 5, 2
    global_crops, local_crops = torch.randn(2 * B, 3, 32, 32), torch.randn(L * B, 3, 16, 16)
    taps = student_taps(_pairs(B, L))
    out = model(global_crops, local_crops, taps)
    assert model.head.mlp[1].num_batches_tracked.item() == 1  # the student's rows in one call, as DINO's head
    with torch.no_grad():
        tokens = [model.backbone(global_crops), model.backbone(local_crops)]
        samples = model.srs(tokens[0].patch, taps.index, taps.weight).flatten(0, 1)
        rows = torch.cat([torch.cat([t.cls for t in tokens]), torch.cat([t.cls_plus for t in tokens]), samples])
    expected = _head_float64(model.head, rows)
    got = torch.cat([out.cls, out.cls_plus, out.patch.flatten(0, 1)])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # leading dims are rows too: a [S, n, C] call equals the [S * n, C] one, and without BatchNorm one [C] row works
    torch.testing.assert_close(model.head(rows.reshape(4, -1, 32)).flatten(0, 1), model.head(rows))
    plain = DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)
    torch.testing.assert_close(plain(rows[0]), plain(rows[:1])[0])


def test_alpha_reaches_the_loss_and_the_targets(tmp_path):
    """--alpha is the loss's alpha and blends the step's cls+ targets: the same networks and batch give the same cls
    and patch terms and another cls+ term."""
    from test_train_fused import one_batch
    from udi.step import build_step
    parts = {}
    for alpha in (0.0, 1.0):
        utils.fix_random_seeds(0)
        step = build_step(tiny_args(tmp_path, "--alpha", str(alpha)))
        assert step.loss.alpha == alpha
        (views, boxes), = one_batch(torch.float32)
        parts[alpha] = step(views, boxes, epoch=0, seed=1)[1]
    assert parts[0.0]["cls"] == parts[1.0]["cls"] and parts[0.0]["patch"] == parts[1.0]["patch"]
    assert abs(parts[0.0]["cls_plus"] - parts[1.0]["cls_plus"]) > 1e-3


def test_teacher_with_head_batchnorm_is_deterministic_and_uses_its_batch(tmp_path):
    args = tiny_args(tmp_path, "--use_bn_in_head", "true")
    teacher = build_model(args, teacher=True)
    images = torch.randn(6, 3, 32, 32)
    pairs = _pairs(B=3, L=2)
    first, second = (split_last_layer(udi_teacher_targets(teacher, images, pairs, 0.5))[0] for _ in range(2))
    assert torch.equal(first.cls, second.cls) and torch.equal(first.patch, second.patch)
    assert teacher.training and teacher.head.mlp[1].training  # batch statistics, as DINO's teacher


# ---- schedules, k-NN --------------------------------------------------------------------------------

def test_lr_schedule():
    lr = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(lr) == 20 and lr[0] == 0 and lr[4] == pytest.approx(1.0) and lr[5] == pytest.approx(1.0)
    assert lr[-1] > 0.1 and np.all(np.diff(lr[5:]) <= 0)


def test_knn_classify_separable():
    centers = F.normalize(torch.randn(3, 16), dim=-1)
    labels = torch.arange(60) % 3
    features = F.normalize(centers[labels] + 0.05 * torch.randn(60, 16), dim=-1)
    assert knn_classify(features[:45], labels[:45], features[45:], labels[45:], k=5) == 100.0
    assert knn_classify(features[:45], labels[:45], features[45:], (labels[45:] + 1) % 3, k=5) == 0.0


@pytest.mark.parametrize("temperature, winner", [(0.07, 0), (1e-3, 2), (1e-30, 2)])
def test_knn_vote_is_finite_at_any_temperature(temperature, winner):
    """One neighbour of class 2 at similarity 0.99, four of class 0 at 0.9: DINO's 0.07 lets the four outvote it,
    a small temperature (where exp(sim / T) overflows) leaves the nearest alone."""
    test = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[0.99, (1 - 0.99 ** 2) ** 0.5]] + [[0.9, -(1 - 0.9 ** 2) ** 0.5]] * 4)
    labels = torch.tensor([2, 0, 0, 0, 0])
    assert knn_classify(train, labels, test, torch.tensor([winner]), k=5, temperature=temperature) == 100.0


def test_linear_probe_learns_separable_classes_and_not_shuffled_ones():
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 24, generator=gen)
    labels = torch.arange(400) % 4
    features = directions[labels] + 0.5 * torch.randn(400, 24, generator=gen)
    train, test = slice(0, 300), slice(300, 400)
    assert eval_linear.linear_probe(features[train], labels[train], features[test], labels[test], epochs=20) > 95
    shuffled = labels[train][torch.randperm(300, generator=gen)]
    assert eval_linear.linear_probe(features[train], shuffled, features[test], labels[test], epochs=20) < 60


def test_eval_linear_runs_on_a_checkpoint(tmp_path):
    args = tiny_args(tmp_path)
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pth"
    torch.save({"args": vars(args), "teacher": build_model(args).state_dict()}, path)
    results = eval_linear.main(["--pretrained_weights", str(path), "--epochs", "10", "--embedded_data", "scenes"])
    assert set(results) == {"cls", "cls+", "cls ‖ cls+"}
    # a random network on the generated scenes: about chance (10 classes), far from the 90 % of separable features
    assert all(0 <= accuracy < 40 for accuracy in results.values()), results


def test_teacher_entropies_tell_the_collapses_apart():
    K, center = 50, torch.zeros(1, 50)
    uniform = teacher_entropies(torch.full((6, K), 0.3), center, 0.04)  # every image the same, flat: ln K, ln K
    assert uniform["teacher_entropy"] == pytest.approx(np.log(K))
    assert uniform["teacher_batch_entropy"] == pytest.approx(np.log(K))
    one_hot = 10 * F.one_hot(torch.tensor([3] * 6), K).float()  # every image on dimension 3: 0, 0
    dominant = teacher_entropies(one_hot, center, 0.04)
    assert dominant["teacher_entropy"] < 1e-3 and dominant["teacher_batch_entropy"] < 1e-3
    spread = teacher_entropies(10 * F.one_hot(torch.arange(6), K).float(), center, 0.04)  # sharp, distinct: 0, ln 6
    assert spread["teacher_entropy"] < 1e-3 and spread["teacher_batch_entropy"] == pytest.approx(np.log(6), abs=1e-3)
    centred = teacher_entropies(one_hot, one_hot[:1], 0.04)  # the center removes what all rows share
    assert centred["teacher_entropy"] == pytest.approx(np.log(K))


# ---- runs ----------------------------------------------------------------------------------------------

def test_short_run_loss_finite_and_decreasing(tmp_path):
    # constant teacher temperature and a fast teacher: the loss falls within a few epochs
    args = tiny_args(tmp_path, "--epochs", "6", "--embedded_images", "16", "--lr", "0.05", "--momentum_teacher",
                     "0.9", "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.04")
    train_udi(args)
    log = read_log(tmp_path)
    losses = [r["train_loss"] for r in log]
    assert len(log) == 6 and all(np.isfinite(losses))
    assert all(0 <= r["train_teacher_entropy"] <= np.log(64) + 1e-4 for r in log)
    assert all(0 <= r["train_teacher_batch_entropy"] <= np.log(64) + 1e-4 for r in log)
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert {"student", "teacher", "optimizer", "epoch", "args", "udi_loss", "scaler"} <= set(checkpoint)
    assert checkpoint["epoch"] == 6
    centers = checkpoint["udi_loss"]
    assert set(centers) == {"center_cls.center", "center_cls_plus.center", "center_patch.center"}
    assert all(torch.isfinite(c).all() and c.abs().sum() > 0 for c in centers.values())


def test_kill_and_resume_gives_the_same_trajectory(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _, teacher = train_udi(tiny_args(straight, "--drop_path_rate", "0.1"))
    train_udi(tiny_args(resumed, "--drop_path_rate", "0.1"), stop_after_epoch=0)
    assert len(read_log(resumed)) == 1
    _, teacher_resumed = train_udi(tiny_args(resumed, "--drop_path_rate", "0.1"))
    assert read_log(straight) == read_log(resumed)
    for a, b in zip(teacher.state_dict().values(), teacher_resumed.state_dict().values()):
        assert torch.equal(a, b)


def _ddp_worker(rank, world_size, port, output_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_udi(tiny_args(output_dir, *NO_HEAD_BATCHNORM, "--batch_size_per_gpu", "2", "--epochs", "1"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoRankPatchLoss(UDILoss):
    """One process scoring L_patch as 2 DDP ranks do (UDI_SPEC §5: over the valid samples *on the rank*): each
    half of the images over its own count, the halves averaged as DDP averages the gradients."""

    def _patch_loss(self, student, targets, tau_t, **last_layers):
        B = targets.cls.shape[0] // 2
        halves = [super(TwoRankPatchLoss, self)._patch_loss(
            student._replace(patch=student.patch[rows]),
            targets._replace(patch=targets.patch[rows], patch_mask=targets.patch_mask[rows]), tau_t, **last_layers)
            for rows in torch.arange(2 * B).reshape(2, 2, B // 2).transpose(0, 1).flatten(1)]
        return DistillCrossEntropyResult(*(sum(values) for values in zip(*halves)))._replace(
            loss=(halves[0].loss + halves[1].loss) / 2)


def test_two_process_ddp_equals_one_process(tmp_path, monkeypatch):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    with monkeypatch.context() as patched:
        patched.setattr("udi.step.UDILoss", TwoRankPatchLoss)
        train_udi(tiny_args(single, *NO_HEAD_BATCHNORM, "--batch_size_per_gpu", "4", "--epochs", "1"))
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    one, two = (torch.load(d / "checkpoint.pth", weights_only=False) for d in (single, ddp))
    for key in ("student", "teacher", "udi_loss"):
        for name, value in one[key].items():
            other = two[key][name]
            if name.endswith("qkv.bias"):
                # the key bias has an identically zero gradient (softmax shift invariance): AdamW turns the
                # rounding noise of a different reduction order into lr-sized steps, so it is left out
                C = value.shape[0] // 3
                value, other = torch.cat([value[:C], value[2 * C:]]), torch.cat([other[:C], other[2 * C:]])
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    assert read_log(single)[0]["train_loss"] == pytest.approx(read_log(ddp)[0]["train_loss"], rel=1e-5)


def test_teacher_is_deterministic_while_the_student_drops_paths(tmp_path):
    args = tiny_args(tmp_path, "--drop_path_rate", "0.5", "--depth", "3")
    student, teacher = build_model(args).train(), build_model(args, teacher=True).train()
    teacher.load_state_dict(student.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.backbone(images).patch, teacher.backbone(images).patch)
        assert not torch.allclose(student.backbone(images).patch, student.backbone(images).patch)


# ---- the DINO objective and the embedded evaluation (issue 12) -----------------------------------------------

def test_dino_objective_trains_one_class_token_without_srs_head(tmp_path, capsys):
    from udi.eval_embedded import evaluate
    # a sharp, fast teacher: the loss falls within a few epochs (on 16 images it climbs again later)
    args = tiny_args(tmp_path, *NO_HEAD_BATCHNORM, "--objective", "dino", "--epochs", "4", "--embedded_images", "16",
                     "--lr", "0.01", "--momentum_teacher", "0.9", "--warmup_teacher_temp", "0.02", "--teacher_temp",
                     "0.02")
    student, teacher = train_udi(args)
    losses = [r["train_loss"] for r in read_log(tmp_path)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and np.mean(losses[-2:]) < 0.8 * losses[0], losses
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch [")]
    assert len(epoch_lines) == 4 and f"loss (DINO, cls) {losses[-1]:.4f} | teacher entropy" in epoch_lines[-1]
    assert not hasattr(student, "srs")
    assert teacher.backbone.cls_token.shape == (1, 1, 32) and teacher.backbone.pos_embed.shape == (1, 1 + 16, 32)
    out = teacher.backbone(torch.randn(2, 3, 32, 32))
    assert out.cls_plus is None and out.patch.shape == (2, 16, 32)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert "dino_loss" in checkpoint and "udi_loss" not in checkpoint
    assert torch.isfinite(checkpoint["dino_loss"]["center"]).all()
    metrics = evaluate(teacher.backbone, 32, torch.device("cpu"), train_count=40, test_count=20)
    assert set(metrics) == {"knn_cls", "linear_cls", "dense_accuracy", "dense_miou"}
    assert all(0 <= v <= 100 for v in metrics.values())


def test_attention_maps_of_both_objectives_beside_a_random_network(tmp_path):
    from udi.visualize import attention_grids, held_out_images, save_attention_maps
    udi, dino = (build_model(tiny_args(tmp_path, "--objective", objective, "--patch_size", "4")).backbone
                 for objective in ("udi", "dino"))
    pictures = held_out_images("digits", 2, 32)
    assert attention_grids(udi, pictures[next(iter(pictures))][0]).shape == (2, 2, 8, 8)  # cls, cls+; 2 heads
    grids = attention_grids(dino, pictures[next(iter(pictures))][0])
    assert grids.shape == (1, 2, 8, 8)
    torch.testing.assert_close(grids.sum((-2, -1)), torch.ones(1, 2), atol=0.05, rtol=0)  # most mass on patches
    for backbone in (udi, dino):
        paths = save_attention_maps({"trained": backbone, "random init": backbone}, tmp_path / "maps", pictures,
                                    torch.device("cpu"))
        assert len(paths) == 2 and all(os.path.getsize(p) > 1000 for p in paths)
