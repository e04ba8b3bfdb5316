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


def _slice(arg, dim: Optional[int], i: int):
    return arg if dim is None else arg.select(dim, i)


def _stacked(results: list):
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0


def register_loop_vmap(registered, op: Callable) -> None:
    """torch.func.vmap of a registered op: the op on each slice of the mapped dimension, stacked, so that vmap gives
    exactly what a Python loop over the slices gives (the kernels have no batched form of their own)."""
    def rule(info, in_dims, *args):
        return _stacked([op(*(_slice(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)])
    torch.library.register_vmap(registered)(rule)


def _transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def _refuse_autograd_transforms(op_name: str) -> None:
    """torch.func's grad, vjp, jacrev, jacfwd, jvp (and hessian) need a functorch-aware autograd of the kernels,
    which they do not have: a clear error instead of torch's about setup_context. vmap alone is supported."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType
    if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters()):
        raise RuntimeError(f"torch.func.grad / vjp / jacrev / jacfwd / jvp are not supported by the native and "
                           f"Triton kernels of {op_name} (torch.func.vmap is): use backend='reference' under "
                           "these transforms, or torch.autograd")


def register_kernels(op_name: str, forward, fake: Callable, backward: Optional[Backward] = None) -> Callable:
    """Fake impl, vmap rule and (with `backward`) autograd of one backend's registered forward op (a name or a
    custom op). Returns the function the public op calls: the registered op, in eager mode under _BelowAutograd."""
    torch.library.register_fake(forward)(fake)
    op = getattr(torch.ops.udi_kernels, forward.split("::")[1]).default if isinstance(forward, str) else forward
    register_loop_vmap(forward, op)
    if backward is None:
        return op
    torch.library.register_fake(backward.op)(backward.fake)
    register_loop_vmap(backward.op, backward.op)
    torch.library.register_autograd(forward, lambda ctx, *grads: backward.input_grads(ctx, ctx.needs_input_grad,
                                                                                      *grads),
                                    setup_context=backward.setup_context)
    torch.library.register_autograd(backward.op, _no_double_backward(op_name),
                                    setup_context=lambda ctx, inputs, output: None)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if _transforms_active():
            _refuse_autograd_transforms(op_name)
            return op(*inputs)  # vmap: the loop rule (register_loop_vmap)
        return _BelowAutograd.apply(op, backward, *inputs)
    return call
