"""The one registration pattern of every op's kernels.

Each op has a native kernel registered from C++ (udi_kernels::<op>, and udi_kernels::<op>_backward when it has a
gradient) and a Triton kernel registered as a torch.library custom op (udi_kernels::<op>_triton, and
_triton_backward). register_kernels gives each of them a fake impl (torch.compile, meta tensors) and, for an op
with a gradient, its autograd: the forward's gradient runs the registered backward op, which has none itself.
The public op resolves a backend from its declaration (udi_kernels/declarations.py) and calls what register_kernels
returns (the registered op; in eager mode under one shared autograd.Function below the autograd key, for less host
time per call), or the eager reference. Follows pytorch/extension-cpp's layout (C++ schema
and kernels, Python fake impls and autograd through torch.library).
"""
from typing import Callable, NamedTuple, Optional

import torch


class Backward(NamedTuple):
    """The autograd of a registered op: its backward op (and that op's fake impl), the setup_context that saves
    what the backward reads, and input_grads(ctx, needs_input_grad, *output_grads) -> the input gradients."""
    op: object
    fake: Callable
    setup_context: Callable
    input_grads: Callable


def _no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(f"{op_name} supports first-order gradients only (no double backward)")
    return backward


class _BelowAutograd(torch.autograd.Function):
    """Eager mode: a registered op with its Backward, called below the autograd dispatch key. This skips the Python
    autograd layer that torch.library.register_autograd puts in front of the op (tens of µs of host time per call,
    benchmarks/NOTES.md); torch.compile traces the registered op and its registered autograd instead."""

    # ctx in forward, no setup_context: with one, Function.apply binds the arguments to the signature on every
    # call (inspect, tens of µs)
    @staticmethod
    def forward(ctx, op, backward: Backward, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*inputs)
        backward.setup_context(ctx, inputs, output)
        ctx.input_grads = backward.input_grads
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + tuple(ctx.input_grads(ctx, ctx.needs_input_grad[2:], *grads))


def register_kernels(op_name: str, forward, fake: Callable, backward: Optional[Backward] = None) -> Callable:
    """Fake impl and (with `backward`) autograd of one backend's registered forward op (a name or a custom op).
    Returns the function the public op calls: the registered op, in eager mode under _BelowAutograd."""
    torch.library.register_fake(forward)(fake)
    op = getattr(torch.ops.udi_kernels, forward.split("::")[1]).default if isinstance(forward, str) else forward
    if backward is None:
        return op
    torch.library.register_fake(backward.op)(backward.fake)
    torch.library.register_autograd(forward, lambda ctx, *grads: backward.input_grads(ctx, ctx.needs_input_grad,
                                                                                      *grads),
                                    setup_context=backward.setup_context)
    torch.library.register_autograd(backward.op, _no_double_backward(op_name),
                                    setup_context=lambda ctx, inputs, output: None)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        return _BelowAutograd.apply(op, backward, *inputs)
    return call
