"""The one registration pattern of every op's kernels.

Each op has a native kernel registered from C++ (udi_kernels::<op>, and udi_kernels::<op>_backward when it has a
gradient) and a Triton kernel registered as a torch.library custom op (udi_kernels::<op>_triton, and
_triton_backward). register_kernels gives each of them a fake impl (torch.compile, meta tensors) and, for an op
with a gradient, its autograd: the forward's gradient runs the registered backward op, which has none itself.
The public op resolves a backend from its declaration (udi_kernels/declarations.py) and calls the registered op,
in eager mode as under torch.compile, or the eager reference. Follows pytorch/extension-cpp's layout (C++ schema
and kernels, Python fake impls and autograd through torch.library).
"""
from typing import Callable, NamedTuple, Optional

import torch


class Backward(NamedTuple):
    """The autograd of a registered op: its backward op (and that op's fake impl), the setup_context that saves
    what the backward reads, and the function from the output gradients to the input gradients."""
    op: object
    fake: Callable
    setup_context: Callable
    input_grads: Callable


def _no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(f"{op_name} supports first-order gradients only (no double backward)")
    return backward


def register_kernels(op_name: str, forward, fake: Callable, backward: Optional[Backward] = None) -> None:
    """Fake impl and (with `backward`) autograd of one backend's registered forward op (a name or a custom op)."""
    torch.library.register_fake(forward)(fake)
    if backward is None:
        return
    torch.library.register_fake(backward.op)(backward.fake)
    torch.library.register_autograd(forward, backward.input_grads, setup_context=backward.setup_context)
    torch.library.register_autograd(backward.op, _no_double_backward(op_name),
                                    setup_context=lambda ctx, inputs, output: None)
