"""Every tensor argument of the losses' ops may be a strided (non-contiguous) view, on every backend: the result is
the contiguous call's, bit for bit (a non-contiguous center_id stopped the native kernels)."""
import pytest
import torch

import udi_kernels
from udi_kernels import backends

from test_distill_cross_entropy import make_case

TENSORS = ("student", "teacher", "centers", "center_id", "pair_student", "pair_teacher", "pair_weight", "row_weight")


def strided(t):
    """The same values as a view with every stride doubled."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def distill_call(case, backend):
    return udi_kernels.distill_cross_entropy(**case, tau_s=0.1, tau_t=0.04, backend=backend)


def linear_call(case, backend):
    g = torch.Generator().manual_seed(1)
    student, teacher = case["student"][:, :8], case["teacher"][:, :8]
    weight, teacher_weight = (torch.randn(case["centers"].shape[1], 8, generator=g) for _ in range(2))
    return udi_kernels.linear_distill_cross_entropy(
        student, weight, teacher, teacher_weight, case["centers"], case["center_id"], case["pair_student"],
        case["pair_teacher"], case["pair_weight"], case["row_weight"], 0.1, 0.04, backend=backend)


def cases():
    for op, call in (("distill_cross_entropy", distill_call), ("linear_distill_cross_entropy", linear_call)):
        for backend in backends.available(op, "cpu"):
            yield pytest.param(call, backend, id=f"{op}-{backend}")


@pytest.mark.parametrize("name", TENSORS)
@pytest.mark.parametrize("call, backend", list(cases()))
def test_a_strided_argument_gives_the_contiguous_result(call, backend, name):
    case = make_case(7, 5, 33, 2, 11)
    expected = call(case, backend)
    view = strided(case[name])
    assert not view.is_contiguous()
    got = call({**case, name: view}, backend)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
