"""A teacher that carries a graph (issue 21 §8; lightly-ai/lightly-train #352: a teacher with trainable
parameters): every loss, native and compat, treats the teacher's tensors as constants, as DINO's `.detach()` does.
Each loss is run twice on the same values, once with teacher tensors that require grad (through an op, so that they
carry a graph) and once detached: the same loss, centers and student gradients, and no gradient reaches the teacher."""
import copy

import numpy as np
import pytest
import torch

from udi_kernels.compat import UDILoss as CompatUDILoss
from udi_kernels.compat.lightly import DINOLoss as LightlyDINOLoss
from udi_kernels.losses import DINOLoss, IBOTPatchLoss, UDILoss, cls_plus_targets
from udi_kernels.testing.losses import random_udi_inputs

from test_compat import nested_outputs

K = 48


def with_graph(tensors, leaves):
    """Each floating tensor of `tensors` (nested lists / tuples / None) as `leaf * 1` of a new leaf that requires
    grad; the leaves are appended to `leaves`."""
    if isinstance(tensors, torch.Tensor) and tensors.is_floating_point():
        leaf = tensors.detach().clone().requires_grad_(True)
        leaves.append(leaf)
        return leaf * 1
    if isinstance(tensors, (list, tuple)) and not hasattr(tensors, "_fields"):
        return type(tensors)(with_graph(t, leaves) for t in tensors)
    if hasattr(tensors, "_fields"):
        return tensors._replace(**{k: with_graph(v, leaves) for k, v in tensors._asdict().items()})
    return tensors


def udi_case():
    student, teacher = random_udi_inputs(2, 2, K, 4, 3, seed=1)
    return UDILoss(K, 4), student, teacher, lambda loss, s, t: loss(s, t, 1)[0]


def udi_targets_case():
    loss, student, teacher, _ = udi_case()
    return loss, student, cls_plus_targets(teacher), lambda loss, s, t: loss(s, t, 1)[0]


def udi_bottleneck_case():
    D = 8
    student = random_udi_inputs(2, 2, D, 4, 3, seed=2)[0]
    teacher = cls_plus_targets(random_udi_inputs(2, 2, D, 4, 3, seed=3)[1])
    weights = torch.randn(K, D), torch.randn(K, D)
    return UDILoss(K, 4), (student, weights[0]), (teacher, weights[1]), \
        lambda loss, s, t: loss(s[0], t[0], 1, weight=s[1], teacher_weight=t[1])[0]


def dino_case(centering="ema"):
    loss = DINOLoss(K, 4, 0.04, 0.07, 2, 10, centering=centering)
    return loss, torch.randn(4 * 3, K), torch.randn(2 * 3, K), lambda loss, s, t: loss(s, t, 1)


def ibot_case():
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) < 0.6
    return IBOTPatchLoss(K, 0.04, 0.07, 2, 10), torch.randn(3, 5, K), torch.randn(3, 5, K), \
        lambda loss, s, t: loss(s, t, mask, 1)


def compat_udi_case():
    student, teacher, _ = nested_outputs(2, 2, K, 4, 3, seed=4)
    schedule = np.full(5, 0.05)
    return CompatUDILoss(2, K, schedule), student, teacher, lambda loss, s, t: loss(s, t, 1)[0]


def lightly_case():
    views = [torch.randn(3, K) for _ in range(4)]
    return LightlyDINOLoss(K), views, views[:2], lambda loss, s, t: loss(t, s, epoch=1)


CASES = {"UDILoss": udi_case, "UDILoss UDITargets": udi_targets_case, "UDILoss bottleneck": udi_bottleneck_case,
         "DINOLoss": dino_case, "DINOLoss sinkhorn": lambda: dino_case("sinkhorn_knopp"), "IBOTPatchLoss": ibot_case,
         "compat.UDILoss": compat_udi_case, "compat.lightly.DINOLoss": lightly_case}


@pytest.mark.parametrize("case", CASES)
def test_a_teacher_that_requires_grad_is_treated_as_detached(case):
    loss_fn, student, teacher, call = CASES[case]()
    results = []
    for teacher_graph in (False, True):
        student_leaves, teacher_leaves = [], []
        module = copy.deepcopy(loss_fn)
        s = with_graph(student, student_leaves)
        t = with_graph(teacher, teacher_leaves) if teacher_graph else teacher
        loss = call(module, s, t)
        loss.backward()
        assert all(leaf.grad is None for leaf in teacher_leaves), "a gradient reached the teacher"
        results.append((loss.detach(), [leaf.grad for leaf in student_leaves],
                        [b.clone() for b in module.buffers()]))
    (loss, grads, buffers), (loss_graph, grads_graph, buffers_graph) = results
    assert torch.equal(loss, loss_graph)
    assert len(grads) == len(grads_graph) and any(g is not None for g in grads)  # masks get none
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(grads, grads_graph))
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_graph))
