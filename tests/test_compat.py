"""udi_kernels.compat against float64 implementations of the code bases it replaces, written from their semantics.

- MaskedAttention and UDILoss: the reference UDI code (github ISL-CV/udi, commit 133c2cb) as UDI_SPEC §3, §5 and §9
  describe it; that code is not needed here (CI has no network). Its state-dict keys are written below as data.
- udi_kernels.losses.DINOLoss: DINO's main_dino.py DINOLoss (state key `center` [1, K]).
- udi_kernels.compat.lightly.DINOLoss: lightly's DINOLoss (state key `center` [1, 1, K]).
Inputs are float32 (logits ~ N(0, 1)); the references run in float64 on the same values. Tolerance: 1e-5 relative
(max |error| / max |expected|) for fp32, 1e-10 for float64 inputs.
"""
import math
import os
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udi_kernels import backends
from udi_kernels.compat import MaskedAttention, UDILoss
from udi_kernels.compat.lightly import DINOLoss as LightlyDINOLoss
from udi_kernels.losses import DINOLoss

LOSS_BACKENDS = [b for b in ("reference", "native", "triton")
                 if backends.why_unavailable(b, "distill_cross_entropy", torch.device("cpu")) is None]
# The losses' structure is backend-independent and each kernel is tested in its own file: every case runs on
# the first two backends, one case per test on the slow Triton interpreter.
EVERY_CASE_BACKENDS, ONE_CASE_BACKENDS = LOSS_BACKENDS[:2], LOSS_BACKENDS[2:]


def loss_cases(cases):
    """(backend, *case) for every case on EVERY_CASE_BACKENDS, and for the first case on ONE_CASE_BACKENDS."""
    return [(backend, *case) for backend in EVERY_CASE_BACKENDS for case in cases] + \
        [(backend, *cases[0]) for backend in ONE_CASE_BACKENDS]
ATTENTION_BACKENDS = [b for b in ("reference", "native")
                      if backends.why_unavailable(b, "srs_attention", torch.device("cpu")) is None]
FP32, FP64 = 1e-5, 1e-10


def assert_close_rel(actual, expected, tolerance):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert error <= tolerance, f"max relative error {float(error):.3g} > {tolerance}"


# ---- the reference's state-dict keys and shapes (read from its code), as data ------------------------------------

def masked_attention_state(C, qkv_bias):
    state = {"qkv.weight": (3 * C, C), "qkv.bias": (3 * C,), "proj.weight": (C, C), "proj.bias": (C,),
             "norm.weight": (C,), "norm.bias": (C,)}
    if not qkv_bias:
        del state["qkv.bias"]
    return state


def udi_loss_state(num_ctr, K):
    return {"centering.center": (num_ctr, K), "centering.count": (num_ctr, 1)}


def assert_strict_round_trip(module, key_shapes):
    """A state dict with exactly these keys and shapes loads strictly, and the module's own has exactly them."""
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == key_shapes
    state = {k: torch.randn(shape) for k, shape in key_shapes.items()}
    module.load_state_dict(state, strict=True)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])


# ---- MaskedAttention -----------------------------------------------------------------------------------------------

def masked_attention_reference(params, x, map, num_heads, skip_connection=True, eps=1e-6):
    """UDI_SPEC §9 in float64: q_s = map @ q; rows with map.sum(-1) <= 0 attend uniformly (their logits replaced by
    a constant); out = LayerNorm(proj(attn @ v) + map @ x); attn returned times the row mask."""
    p = {k: v.double() for k, v in params.items()}
    x, map = x.double(), map.double()
    M, B, S, N = map.shape
    C = x.shape[-1]
    D = C // num_heads
    q, k, v = F.linear(x, p["qkv.weight"], p.get("qkv.bias")).view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    q_s = torch.einsum("mbsn,bhnd->mbhsd", map, q)
    logits = torch.einsum("mbhsd,bhnd->mbhsn", q_s, k) * D ** -0.5
    attends = (map.sum(-1) > 0)[:, :, None, :, None]
    attn = torch.softmax(torch.where(attends, logits, 1e-9), dim=-1)
    o = F.linear(torch.einsum("mbhsn,bhnd->mbshd", attn, v).reshape(M, B, S, C), p["proj.weight"], p["proj.bias"])
    if skip_connection:
        o = o + torch.einsum("mbsn,bnc->mbsc", map, x)
    return F.layer_norm(o, (C,), p["norm.weight"], p["norm.bias"], eps), attn * attends


def sample_maps(M, B, S, N, generator, dtype=torch.float32):
    """Rows of every kind the reference meets or accepts: one-hot and bilinear samples, dense rows, padding (all 0)
    and signed rows summing to <= 0 (masked by the reference, but still in its skip term)."""
    map = torch.zeros(M, B, S, N, dtype=dtype)
    kinds = torch.randint(0, 5, (M, B, S), generator=generator)
    for (m, b, s), kind in zip(np.ndindex(M, B, S), kinds.flatten().tolist()):
        if kind == 0:
            map[m, b, s, torch.randint(0, N, (1,), generator=generator)] = 1
        elif kind == 1:
            weight = torch.rand(4, generator=generator, dtype=dtype)
            map[m, b, s].index_add_(0, torch.randint(0, N, (4,), generator=generator), weight / weight.sum())
        elif kind == 2:
            map[m, b, s] = torch.rand(N, generator=generator, dtype=dtype)
        elif kind == 3:
            index = torch.randperm(N, generator=generator)[:2]
            map[m, b, s, index] = torch.tensor([0.5, -0.5 - float(torch.rand(1, generator=generator))], dtype=dtype)
    return map


def random_parameters(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + (parameter.dim() == 1) * 0.1)
    return module


ATTENTION_SHAPES = [  # (M, B, N, C, H, S): M·S <= head dim (attention over h) and > head dim (over tokens)
    (2, 3, 37, 30, 5, 3),
    (3, 1, 36, 24, 2, 7),
    (1, 2, 25, 20, 4, 9),
]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("qkv_bias, skip_connection", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, FP32), (torch.float64, FP64)])
def test_masked_attention_matches_the_reference_on_every_row(backend, shape, qkv_bias, skip_connection, dtype,
                                                             tolerance):
    M, B, N, C, H, S = shape
    generator = torch.Generator().manual_seed(M * 100 + S)
    module = MaskedAttention(C, H, qkv_bias, skip_connection, backend=backend).to(dtype)
    random_parameters(module, generator).eval()
    x = torch.randn(B, N, C, generator=generator, dtype=dtype, requires_grad=True)
    map = sample_maps(M, B, S, N, generator, dtype).requires_grad_()
    out, attn = module(x, map)
    expected_out, expected_attn = masked_attention_reference(dict(module.named_parameters()), x, map, H,
                                                             skip_connection)
    assert out.dtype == dtype and out.shape == (M, B, S, C) and attn.shape == (M, B, H, S, N)
    assert_close_rel(out, expected_out, tolerance)
    assert_close_rel(attn, expected_attn, tolerance)
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (out, attn)]
    inputs = [x, map, *module.parameters()]
    grads = torch.autograd.grad((out * weights[0]).sum() + (attn * weights[1]).sum(), inputs)
    expected_grads = torch.autograd.grad((expected_out * weights[0]).sum() + (expected_attn * weights[1]).sum(),
                                         inputs)
    for grad, expected in zip(grads, expected_grads):
        assert_close_rel(grad, expected, 10 * tolerance)


def test_masked_attention_constructor_is_the_references():
    module = MaskedAttention(384, 6)
    assert module.qkv.bias is None and module.skip_connection and module.norm.eps == 1e-6
    assert module.scale == 0.125 and module.num_heads == 6
    assert [name for name, _ in module.named_children()] == ["qkv", "proj", "norm", "attn_drop", "proj_drop"]
    # positional order (dim, num_heads, qkv_bias, skip_connection, norm_layer)
    module = MaskedAttention(48, 6, True, False, partial(nn.LayerNorm, eps=1e-3))
    assert module.qkv.bias is not None and not module.skip_connection and module.norm.eps == 1e-3
    module = MaskedAttention(dim=48, num_heads=4, qkv_bias=True, skip_connection=False, norm_layer=nn.Identity)
    assert isinstance(module.norm, nn.Identity) and module.scale == 12 ** -0.5


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_masked_attention_state_dict_is_the_references(qkv_bias):
    assert_strict_round_trip(MaskedAttention(36, 6, qkv_bias), masked_attention_state(36, qkv_bias))


def test_masked_attention_init_statistics():
    """Truncated normal, std 0.02, cut at ±2 (100 std). The reference's inverse-CDF sampler maps a uniform draw of
    exactly -1 to -inf, clamped to -2: about one weight in 2^24, so such outliers are allowed, nothing else."""
    module = MaskedAttention(384, 6, True)
    for linear in (module.qkv, module.proj):
        weight = linear.weight.double().flatten()
        outliers = weight.abs() > 0.2
        assert outliers.sum() <= 2 and (weight[outliers].abs() == 2).all()
        weight = weight[~outliers]
        assert abs(weight.std().item() - 0.02) < 0.0003 and abs(weight.mean().item()) < 0.0003
        assert not linear.bias.any()
    assert torch.equal(module.norm.weight, torch.ones(384)) and not module.norm.bias.any()


def inverse_cdf_truncated_normal(shape, std, a=-2.0, b=2.0):
    """The reference's init sampler: one uniform draw per element, mapped through the normal's inverse CDF."""
    cdf = lambda value: (1 + math.erf(value / std / math.sqrt(2))) / 2  # noqa: E731
    uniform = torch.empty(shape).uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1)
    return (uniform.erfinv_() * (std * math.sqrt(2))).clamp_(a, b)


def test_masked_attention_draws_the_references_random_numbers():
    """Same seed, same parameters and the same random stream afterwards as the reference's constructor: its
    Linear layers are built (default init draws), then each Linear weight is redrawn by the inverse-CDF sampler."""
    C = 24
    torch.manual_seed(5)
    module = MaskedAttention(C, 4, True)
    after = torch.rand(3)
    torch.manual_seed(5)
    nn.Linear(C, 3 * C), nn.Linear(C, C)
    qkv, proj = inverse_cdf_truncated_normal((3 * C, C), 0.02), inverse_cdf_truncated_normal((C, C), 0.02)
    assert torch.equal(module.qkv.weight, qkv) and torch.equal(module.proj.weight, proj)
    assert torch.equal(torch.rand(3), after)


class UDIWrapperHead(nn.Module):
    """The reference's utils.UDIWrapper head path (UDI_SPEC §9): norm1, then the attention; return_attention=True
    returns the attention's second output (its visualisation path), else the sample tokens."""

    def __init__(self, attn):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(attn.qkv.in_features, eps=1e-6), attn

    def forward(self, x, map, return_attention=False):
        x_ph, attn = self.attn(self.norm1(x), map)
        return attn if return_attention else [x_ph]


def test_visualisation_path_gets_the_masked_probabilities_and_training_pays_nothing(monkeypatch):
    M, B, N, C, H, S = 2, 2, 36, 24, 4, 5
    generator = torch.Generator().manual_seed(3)
    wrapper = UDIWrapperHead(random_parameters(MaskedAttention(C, H, True), generator))
    x, map = torch.randn(B, N, C, generator=generator), sample_maps(M, B, S, N, generator)
    _, expected = masked_attention_reference(wrapper.attn.state_dict(), wrapper.norm1(x), map, H)
    with torch.no_grad():  # train mode, autograd off
        assert_close_rel(wrapper(x, map, return_attention=True), expected, FP32)
    wrapper.eval()  # eval mode, autograd on
    assert_close_rel(wrapper(x, map, return_attention=True), expected, FP32)
    padding = map.sum(-1) <= 0
    assert padding.any() and not wrapper(x, map, return_attention=True).permute(0, 1, 3, 2, 4)[padding].any()
    wrapper.attn.compute_attention = False
    assert wrapper(x, map, return_attention=True) is None
    wrapper.train()
    wrapper.attn.compute_attention = None
    monkeypatch.setattr(wrapper.attn, "_probabilities", lambda *args: pytest.fail("probabilities formed in training"))
    assert wrapper(x, map, return_attention=True) is None
    out, = wrapper(x, map)
    out.sum().backward()
    wrapper.attn.compute_attention = True
    monkeypatch.undo()
    assert_close_rel(wrapper(x, map, return_attention=True), expected, FP32)


@pytest.mark.parametrize("M, B, S", [(0, 2, 3), (2, 0, 3), (2, 3, 0), (0, 0, 0)])
def test_masked_attention_empty_inputs(M, B, S):
    module = MaskedAttention(12, 3, True).eval()
    x = torch.randn(B, 7, 12, requires_grad=True)
    out, attn = module(x, torch.rand(M, B, S, 7))
    assert out.shape == (M, B, S, 12) and attn.shape == (M, B, 3, S, 7)
    (out.sum() + attn.sum()).backward()
    assert x.grad.shape == x.shape and not x.grad.any()


def test_masked_attention_bad_shapes_are_named():
    module = MaskedAttention(12, 3)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, 12\]"):
        module(torch.randn(2, 7, 10), torch.rand(1, 2, 3, 7))
    with pytest.raises(ValueError, match=r"map must have shape \[M, B=2, S, N=7\]"):
        module(torch.randn(2, 7, 12), torch.rand(1, 2, 3, 8))
    with pytest.raises(ValueError, match="divisible"):
        MaskedAttention(12, 5)
    with pytest.raises(ValueError, match="x must be on the device of the module's parameters"):
        module(torch.randn(2, 7, 12, device="meta"), torch.rand(1, 2, 3, 7))  # x named, not map


# ---- UDILoss -------------------------------------------------------------------------------------------------------

def H_rows(teacher, student, center, tau_t, tau_s):
    """CE(softmax((t − c)/τt), log_softmax(s/τs)) per row, float64."""
    return -(F.softmax((teacher - center) / tau_t, -1) * F.log_softmax(student.double() / tau_s, -1)).sum(-1)


def udi_loss_reference(student_output, teacher_output, centers, tau_t, L, num_clt=2, include_patch=True, alpha=0.5,
                       tau_s=0.1, weights=None):
    """UDI_SPEC §5 with §9's inputs, outputs and mask weighting, in float64.

    Returns (total, parts, row_means [n, K], row_counts [n]): the teacher rows' mean and count per center on this
    rank (center j ← 0.9·c + 0.1·mean). L = 0: the local terms are 0 (the reference: NaN)."""
    (s_global, s_local), (s_global_mask, _) = student_output
    (t_global, t_local), (t_global_mask, t_local_mask) = teacher_output
    d = lambda t: t.detach().double()  # noqa: E731
    K = centers.shape[1]
    c = centers.double()
    t_cls = d(t_global[0]).reshape(-1, K)
    B = t_cls.shape[0] // 2

    def level_terms(j, student_global, student_local, teacher_global, teacher_local):
        """teacher_local [L, 2B, K]: local row l·B + b against teacher_local[l, g·B + b], g = 0, 1."""
        global_term = H_rows(teacher_global, student_global.reshape(2 * B, K), c[j], tau_t, tau_s).mean()
        local = [H_rows(teacher_local[l, g * B:(g + 1) * B], student_local.reshape(L, B, K)[l], c[j], tau_t, tau_s)
                 for l in range(L) for g in range(2)]
        return global_term, (torch.cat(local).mean() if L else torch.zeros((), dtype=torch.float64))

    levels = [level_terms(0, s_global[0], s_local[0], t_cls, t_cls.expand(L, 2 * B, K))]
    means, counts = [t_cls.mean(0)], [2 * B]
    if include_patch:
        m_g, p_g = d(t_global_mask[-1])[0, ..., 0], d(t_global[-1])[0]  # [2B, Sg], [2B, Sg, K]
        m_l, p_l = d(t_local_mask[-1])[..., 0], d(t_local[-1])            # [L, 2B, Sl], [L, 2B, Sl, K]
    if num_clt == 2:
        plus_g = alpha * (m_g[..., None] * p_g).sum(1) / (m_g.sum(1)[:, None] + 1e-5) + (1 - alpha) * t_cls
        plus_l = alpha * (m_l[..., None] * p_l).sum(2) / (m_l.sum(2)[..., None] + 1e-5) + (1 - alpha) * t_cls
        levels.append(level_terms(1, s_global[1], s_local[1], plus_g, plus_l))
        plus_rows = torch.cat([plus_g, plus_l.reshape(-1, K)])
        means.append(plus_rows.mean(0))
        counts.append(plus_rows.shape[0])
    parts = [[g for g, _ in levels], [l for _, l in levels]]
    totals = [(2 * g + 2 * L * l) / (2 + 2 * L) for g, l in levels]
    if include_patch:
        m_s = s_global_mask[-1].double().reshape(-1)
        ce = H_rows(p_g.reshape(-1, K), s_global[-1].reshape(-1, K), c[-1], tau_t, tau_s)
        patch = (m_s * ce).sum() / m_s.sum() if m_s.sum() else torch.zeros((), dtype=torch.float64)
        parts[0].append(patch)
        totals.append(patch)
        count = m_g.sum() + m_l.sum()
        means.append(((m_g[..., None] * p_g).sum((0, 1)) + (m_l[..., None] * p_l).sum((0, 1, 2))) / count)
        counts.append(count)
    weights = weights or [1 / len(totals)] * len(totals)
    total = sum(w * level for w, level in zip(weights, totals))
    return total, parts, torch.stack(means), torch.tensor([float(n) for n in counts], dtype=torch.float64)


def nested_outputs(B, L, K, Sg, Sl, num_clt=2, include_patch=True, seed=0, dtype=torch.float32):
    """The reference's multi-crop wrapper outputs ((pred, mask) of [global, local] lists) and the student leaves.

    Masks hold the sample maps' row sums: 0 for padding, and here positive values other than 1 for valid samples,
    so that mask values (not just their zero pattern) matter, as in the reference."""
    g = torch.Generator().manual_seed(seed)
    logits = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731

    def mask(*shape):
        return ((torch.rand(*shape, generator=g) < 0.7) * (0.5 + torch.rand(*shape, generator=g))).to(dtype)

    s_global, s_local = [logits(2 * B, 1, K)], [logits(L * B, 1, K)]
    t_global, t_local = [logits(2 * B, 1, K)], [None]
    if num_clt == 2:
        s_global.append(logits(2 * B, 1, K))
        s_local.append(logits(L * B, 1, K))
        t_global.append(None)
        t_local.append(None)
    s_mask_global, s_mask_local = [None] * num_clt, [None] * num_clt
    t_mask_global, t_mask_local = [None] * num_clt, [None] * num_clt
    if include_patch:
        s_mask = mask(1, 2 * B, Sg, 1)
        s_global.append(logits(1, 2 * B, Sg, K))
        s_mask_global.append(s_mask)
        t_global.append(logits(1, 2 * B, Sg, K))
        t_mask_global.append((s_mask > 0) * (0.5 + torch.rand(s_mask.shape, generator=g)).to(dtype))
        t_local.append(logits(L, 2 * B, Sl, K))
        t_mask_local.append(mask(L, 2 * B, Sl, 1))
    leaves = [t.requires_grad_() for t in s_global + s_local]
    return ((s_global, s_local), (s_mask_global, s_mask_local)), ((t_global, t_local), (t_mask_global, t_mask_local)), \
        leaves


CONFIGS = [dict(num_clt=2, include_patch=True), dict(num_clt=1, include_patch=True),
           dict(num_clt=1, include_patch=False)]
SCHEDULE = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(2) * 0.07))


@pytest.mark.parametrize("backend, config, shape", loss_cases(
    [(config, shape) for config in CONFIGS for shape in [(3, 1, 37, 5, 3), (1, 3, 61, 4, 9), (2, 0, 29, 3, 2)]]),
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else
    "x".join(map(str, value)) if isinstance(value, tuple) else None)
def test_udi_loss_matches_the_reference(backend, config, shape):
    B, L, K, Sg, Sl = shape
    weights = [0.2, 0.5, 0.3][:config["num_clt"] + config["include_patch"]]
    loss_fn = UDILoss(L, K, SCHEDULE, weights=weights, backend=backend, **config)
    loss_fn.centering.center.normal_(generator=torch.Generator().manual_seed(7))
    centers = loss_fn.centering.center.double().clone()
    for step, epoch in enumerate((0, 3)):  # the second step uses the centers the first one updated
        student, teacher, leaves = nested_outputs(B, L, K, Sg, Sl, seed=step, **config)
        total, parts = loss_fn(student, teacher, epoch)
        expected, expected_parts, means, counts = udi_loss_reference(student, teacher, centers, SCHEDULE[epoch], L,
                                                                     weights=weights, **config)
        assert_close_rel(total, expected, FP32)
        assert [len(level) for level in parts] == [len(level) for level in expected_parts]
        for level, expected_level in zip(parts, expected_parts):
            for part, expected_part in zip(level, expected_level):
                assert part.dtype == torch.float32 and part.dim() == 0
                assert_close_rel(part, expected_part, FP32)
        grads = torch.autograd.grad(total, leaves)
        expected_grads = torch.autograd.grad(expected, leaves, materialize_grads=True)  # L = 0: no local leaves used
        for grad, expected_grad in zip(grads, expected_grads):
            assert_close_rel(grad, expected_grad, FP32)
        centers = torch.where(counts[:, None] > 0, 0.9 * centers + 0.1 * means, centers)
        assert_close_rel(loss_fn.centering.center, centers, FP32)
    assert not loss_fn.centering.count.any()  # never used by the reference either


@pytest.mark.parametrize("backend", [b for b in LOSS_BACKENDS if b != "triton"])
@pytest.mark.parametrize("B, L", [(2, 2), (3, 1)])
def test_udi_loss_float64_is_exact(backend, B, L):
    """Loss, parts, gradients and the updated centers in float64, to float64 rounding (B = 3: mean weights 1 / 6
    that no float32 holds)."""
    K = 41
    loss_fn = UDILoss(L, K, SCHEDULE, backend=backend).double()
    student, teacher, leaves = nested_outputs(B, L, K, 4, 3, seed=4, dtype=torch.float64)
    total, parts = loss_fn(student, teacher, 2)
    expected, expected_parts, means, _ = udi_loss_reference(student, teacher, torch.zeros(3, K), SCHEDULE[2], L)
    assert_close_rel(total, expected, FP64)
    assert_close_rel(loss_fn.centering.center, 0.1 * means, FP64)
    for part, expected_part in zip(sum(parts, []), sum(expected_parts, [])):
        assert_close_rel(part, expected_part, FP64)
    for grad, expected_grad in zip(torch.autograd.grad(total, leaves), torch.autograd.grad(expected, leaves)):
        assert_close_rel(grad, expected_grad, FP64)


@pytest.mark.parametrize("config", CONFIGS, ids=["udi", "cls_patch", "cls_only"])
def test_udi_loss_state_dict_is_the_references(config):
    num_ctr = config["num_clt"] + config["include_patch"]
    assert_strict_round_trip(UDILoss(2, 33, SCHEDULE, **config), udi_loss_state(num_ctr, 33))


def test_udi_loss_constructor_is_the_references():
    loss_fn = UDILoss(3, 16, SCHEDULE, True, True, 1, 0.3, 0.2, 0.8, [0.25, 0.75])
    assert (loss_fn.num_local_crops, loss_fn.dim, loss_fn.num_clt, loss_fn.alpha, loss_fn.student_temp) == \
        (3, 16, 1, 0.3, 0.2)
    assert loss_fn.include_cls and loss_fn.include_patch and loss_fn.num_ctr == 2
    assert loss_fn.weights == [0.25, 0.75] and loss_fn.centering.center_momentum == 0.8
    assert loss_fn.teacher_temp_schedule is SCHEDULE
    assert UDILoss(3, 16, SCHEDULE).weights == [1 / 3] * 3
    assert UDILoss(3, 16, [0.04, 0.05]).teacher_temp(1) == 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(include_cls=False), "include_cls=False"),
    (dict(num_clt=3), "num_clt must be 1 or 2, got 3"),
    (dict(include_patch=False), "num_clt=2 needs include_patch=True"),
    (dict(weights=[0.5, 0.5]), r"weights must hold one weight per level \(3\), got \[0.5, 0.5\]"),
    (dict(center_mean="mean"), "center_mean must be one of"),
    (dict(num_local_crops=-1), "num_local_crops must be >= 0, got -1"),
])
def test_udi_loss_refuses_unsupported_settings(kwargs, message):
    arguments = dict(num_local_crops=2, dim=8, teacher_temp_schedule=SCHEDULE) | kwargs
    with pytest.raises(ValueError, match=message):
        UDILoss(**arguments)


def test_udi_loss_bad_inputs_are_named():
    loss_fn = UDILoss(2, 8, SCHEDULE)
    student, teacher, _ = nested_outputs(2, 2, 8, 3, 2)
    with pytest.raises(ValueError, match="epoch 5 is outside teacher_temp_schedule"):
        loss_fn(student, teacher, 5)
    with pytest.raises(ValueError, match=r"student_output must be \(pred, mask\)"):
        loss_fn(student[0], teacher, 0)
    (s_global, s_local), masks = student
    with pytest.raises(ValueError, match=r"student_output local cls\+ must hold 4 rows of 8 logits, got \[3, 1, 8\]"):
        loss_fn(((s_global, [s_local[0], s_local[1][:3]]), masks), teacher, 0)
    (t_global, t_local), (t_masks_global, t_masks_local) = teacher
    with pytest.raises(ValueError, match=r"the mask of teacher_output global patch must have shape \[1, 4, 3, 1\]"):
        loss_fn(student, ((t_global, t_local), (t_masks_global[:2] + [None], t_masks_local)), 0)


def test_udi_loss_empty_batch():
    loss_fn = UDILoss(2, 8, SCHEDULE)
    loss_fn.centering.center.normal_()
    before = loss_fn.centering.center.clone()
    student, teacher, leaves = nested_outputs(0, 2, 8, 3, 2)
    total, parts = loss_fn(student, teacher, 1)
    assert total.item() == 0 and all(part.item() == 0 for part in sum(parts, []))
    total.backward()
    assert all(leaf.grad is not None and leaf.grad.numel() == 0 for leaf in leaves)
    assert torch.equal(loss_fn.centering.center, before)


# ---- several processes: exact global center mean (default) or the reference's mean of per-rank means -----------

def _udi_rank_worker(rank, init_file, out_dir, K):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {}
        for center_mean in ("global", "per_rank"):
            loss_fn = UDILoss(2, K, SCHEDULE, center_mean=center_mean)
            student, teacher, _ = nested_outputs(1 + 2 * rank, 2, K, 4, 3, seed=10 + rank)
            total, _ = loss_fn(student, teacher, 1)
            result[center_mean] = (total.detach(), loss_fn.centering.center.clone())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_global_and_per_rank_center_means(tmp_path):
    import torch.multiprocessing as mp
    K = 19
    mp.spawn(_udi_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), K), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    stats = []
    for rank in range(2):  # unequal batches (B = 1 and 3), so the two means differ
        student, teacher, _ = nested_outputs(1 + 2 * rank, 2, K, 4, 3, seed=10 + rank)
        total, _, means, counts = udi_loss_reference(student, teacher, torch.zeros(3, K), SCHEDULE[1], 2)
        stats.append((means, counts))
        for center_mean in ("global", "per_rank"):
            assert_close_rel(ranks[rank][center_mean][0], total, FP32)  # each rank's loss is its own
    (m0, c0), (m1, c1) = stats
    expected = {"global": (m0 * c0[:, None] + m1 * c1[:, None]) / (c0 + c1)[:, None], "per_rank": (m0 + m1) / 2}
    for center_mean, mean in expected.items():
        for rank in ranks:
            assert_close_rel(rank[center_mean][1], 0.1 * mean, FP32)
    assert (expected["global"] - expected["per_rank"]).abs().max() > 1e-2


# ---- DINO (main_dino.py) -------------------------------------------------------------------------------------------

def dino_reference(student, teacher, center, ncrops, tau_t, tau_s=0.1):
    """DINO's loss in float64: teacher global iq against every student crop v != iq, mean over the terms of the
    batch-mean CE; then the center moves towards the mean teacher row."""
    s, t = student.chunk(ncrops), teacher.double().chunk(2)
    terms = [H_rows(t[iq], s[v], center, tau_t, tau_s).mean() for iq in range(2) for v in range(ncrops) if v != iq]
    return sum(terms) / len(terms), 0.9 * center + 0.1 * teacher.double().mean(0, keepdim=True)


def test_dino_loss_resumes_from_a_dino_checkpoint():
    K, ncrops, B = 65, 4, 3
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, 0.1, 0.9)  # main_dino.py's positional arguments
    assert (loss_fn.ncrops, loss_fn.student_temp, loss_fn.center_momentum) == (ncrops, 0.1, 0.9)
    assert_strict_round_trip(loss_fn, {"center": (1, K)})  # main_dino.py's `dino_loss` entry: the buffer `center`
    checkpoint = {"center": torch.randn(1, K)}
    loss_fn.load_state_dict(checkpoint, strict=True)
    center = checkpoint["center"].double()
    for epoch in (1, 2):
        student = torch.randn(ncrops * B, K, requires_grad=True)
        teacher = torch.randn(2 * B, K)
        expected, center_after = dino_reference(student, teacher, center, ncrops, 0.04 + 0.015 * epoch)
        loss = loss_fn(student, teacher, epoch)
        assert_close_rel(loss, expected, FP32)
        assert_close_rel(torch.autograd.grad(loss, student)[0], torch.autograd.grad(expected, student)[0], FP32)
        center = center_after
        assert_close_rel(loss_fn.center, center, FP32)
    assert list(loss_fn.state_dict()) == ["center"]


# ---- lightly -------------------------------------------------------------------------------------------------------

def lightly_reference(teacher_views, student_views, center, tau_t, tau_s=0.1):
    """lightly's DINOLoss in float64: the mean over the (teacher view t, student view s) pairs with s != t of the
    batch-mean CE; then the center [1, 1, K] moves towards the mean teacher row."""
    terms = [H_rows(t.double(), s, center[0], tau_t, tau_s).mean() for i, t in enumerate(teacher_views)
             for j, s in enumerate(student_views) if i != j]
    mean = torch.cat(teacher_views).double().mean(0)
    return sum(terms) / len(terms), 0.9 * center + 0.1 * mean


@pytest.mark.parametrize("backend, T, S, B, K", loss_cases([(2, 6, 3, 47), (2, 2, 4, 33), (3, 5, 2, 21), (1, 3, 5, 17)]))
def test_lightly_dino_loss_matches_lightly(backend, T, S, B, K):
    loss_fn = LightlyDINOLoss(K, 0.04, 0.07, 3, backend=backend)
    loss_fn.center.normal_()
    center = loss_fn.center.double().clone()
    temperatures = [(dict(epoch=1), 0.055), (dict(epoch=7), 0.07), (dict(teacher_temp=0.05, epoch=1), 0.05), ({}, 0.07)]
    generator = torch.Generator().manual_seed(T * S)
    for call, tau_t in temperatures:
        teacher = [torch.randn(B, K, generator=generator) for _ in range(T)]
        student = [torch.randn(B, K, generator=generator, requires_grad=True) for _ in range(S)]
        loss = loss_fn(teacher, student, **call)
        expected, center = lightly_reference(teacher, student, center, tau_t)
        assert_close_rel(loss, expected, FP32)
        expected_grads = torch.autograd.grad(expected, student, materialize_grads=True)  # T = 1: view 0 unused
        for grad, expected_grad in zip(torch.autograd.grad(loss, student), expected_grads):
            assert_close_rel(grad, expected_grad, FP32)
        assert_close_rel(loss_fn.center, center, FP32)


def test_lightly_dino_loss_interface():
    loss_fn = LightlyDINOLoss(12, 0.04, 0.07, 4, 0.2, 0.8)  # lightly's positional order
    assert (loss_fn.teacher_temp, loss_fn.student_temp, loss_fn.center_momentum) == (0.07, 0.2, 0.8)
    assert torch.equal(loss_fn.teacher_temp_schedule, torch.linspace(0.04, 0.07, 4))
    assert_strict_round_trip(loss_fn, {"center": (1, 1, 12)})
    with pytest.raises(ValueError, match="Unknown mode 'median'"):
        LightlyDINOLoss(12, center_mode="median")
    with pytest.raises(ValueError, match="at least one pair of different views"):
        loss_fn([torch.randn(2, 12)], [torch.randn(2, 12)])
    with pytest.raises(ValueError, match="one shape"):
        loss_fn([torch.randn(2, 12)] * 2, [torch.randn(2, 12), torch.randn(3, 12)])
    before = loss_fn.center.clone()
    loss_fn.update_center(torch.ones(2, 3, 12))  # lightly's public update: [views, B, K]
    torch.testing.assert_close(loss_fn.center, 0.8 * before + 0.2)


@pytest.mark.parametrize("make, message", [
    (lambda t: LightlyDINOLoss(12, t, 0.07, 3), "warmup_teacher_temp must not require grad"),
    (lambda t: LightlyDINOLoss(12, 0.04, t * 2, 3), "teacher_temp must not require grad"),
    (lambda t: LightlyDINOLoss(12)([torch.randn(2, 12)] * 2, [torch.randn(2, 12)] * 2, teacher_temp=t),
     "teacher_temp must not require grad"),
    (lambda t: UDILoss(1, 8, [0.04, t]), r"teacher_temp_schedule\[1\] must not require grad"),
    (lambda t: LightlyDINOLoss(12, teacher_temp=1e-40), r"teacher_temp must be >= 2\*\*-126"),
    (lambda t: LightlyDINOLoss(12, student_temp=1e-40), r"student_temp must be >= 2\*\*-126"),
    (lambda t: UDILoss(1, 8, [0.04, 1e-39]), r"teacher_temp_schedule\[1\] must be >= 2\*\*-126"),
    (lambda t: UDILoss(1, 8, [0.04], student_temp=2.0 ** -127), r"student_temp must be >= 2\*\*-126"),
])
def test_compat_temperatures_are_numbers_the_ops_take(make, message):
    """A temperature tensor that requires grad would get no gradient (the losses take temperatures as constants),
    one below 2**-126 has no float32 reciprocal: both refused by the constructor or forward, naming the argument."""
    with pytest.raises((TypeError, ValueError), match=message):
        make(torch.tensor(0.05, requires_grad=True))


def test_lightly_dino_loss_empty_batch():
    loss_fn = LightlyDINOLoss(8)
    loss_fn.center.normal_()
    before = loss_fn.center.clone()
    student = [torch.randn(0, 8, requires_grad=True) for _ in range(3)]
    loss = loss_fn([torch.randn(0, 8)] * 2, student)
    loss.backward()
    assert loss.item() == 0 and torch.equal(loss_fn.center, before)
