"""udi_kernels.stratified_sample: SRS sample positions and their bilinear targets (UDI_SPEC §2)."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from .._native import native_loaded
from ..checks import check_bool, check_int, check_tensor, require
from ..declarations import STRATIFIED_SAMPLE
from ..limits import MAX_GRID
from ..reference import stratified_sample as reference
from .autocast import autocast_off
from .registration import register_kernels

OP = STRATIFIED_SAMPLE.name


class PairTaps(NamedTuple):
    """Taps of every (source crop -> target global crop) pair; valid samples first, then padding.

    src_index  [..., S]    int32    source cell (row * G + col) in the source crop's grid
    tgt_index  [..., S, 4] int32    bilinear taps in the target's grid (row * Gt + col)
    tgt_weight [..., S, 4] float32  their weights, summing to 1 (0 for padding)
    count      [...]       int32    number of valid samples
    """
    src_index: Tensor
    tgt_index: Tensor
    tgt_weight: Tensor
    count: Tensor


class SampledPairs(NamedTuple):
    """globals: [B, 2] pairs (g0->g1, g1->g0); locals: [B, L, 2] pairs (l->g1, l->g0)."""
    globals: PairTaps
    locals: PairTaps


def _fake(boxes, global_grid, global_window, local_grid, local_window, target_grid, seed, offset, image_offset):
    shapes = reference.output_shapes(boxes.shape[0], boxes.shape[1] - 2, global_grid, global_window, local_grid,
                                     local_window)
    return tuple(boxes.new_empty(shape, dtype=dtype) for shape, dtype in shapes)


@torch.library.custom_op("udi_kernels::stratified_sample_triton", mutates_args=())
def _triton_op(boxes: Tensor, global_grid: int, global_window: int, local_grid: int, local_window: int,
               target_grid: int, seed: int, offset: int, image_offset: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels import stratified_sample as triton_kernel  # imported late: TRITON_INTERPRET is read at import
    return triton_kernel.stratified_sample(boxes, global_grid, global_window, local_grid, local_window, target_grid,
                                           seed, offset, image_offset)


_IMPLEMENTATIONS = {"triton": register_kernels(OP, _triton_op, _fake), "reference": reference.stratified_sample}
if native_loaded():
    _IMPLEMENTATIONS["native"] = register_kernels(OP, f"udi_kernels::{OP}", _fake)


def _check_word(value, name):
    value = check_int(value, name)
    if not 0 <= value < 2**32:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return value


def _check_pattern(grid, window, grid_name, window_name):
    grid, window = check_int(grid, grid_name), check_int(window, window_name)
    if window < 1:
        raise ValueError(f"{window_name} must be >= 1, got {window}")
    if not 2 <= grid <= MAX_GRID:
        raise ValueError(f"{grid_name} must be in [2, {MAX_GRID}], got {grid}")
    if grid < window:
        raise ValueError(f"{grid_name} ({grid}) must not be smaller than {window_name} ({window})")
    return grid, window


def _check_boxes(boxes):
    check_tensor(boxes, "boxes", dtypes=STRATIFIED_SAMPLE.support["reference"].dtypes["*"])
    if boxes.dim() != 3 or boxes.shape[1] < 2 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape [B, 2 + L, 4], got {list(boxes.shape)}")


def _check_box_values(boxes):
    """One reduction (one device sync on CUDA; asserted asynchronously under torch.compile): finite, inside [0, 1],
    non-degenerate."""
    require({"boxes must hold finite values inside [0, 1] (normalised 'ij' coordinates)":
             ((boxes >= 0) & (boxes <= 1)).all(),
             "boxes must not be degenerate: i0 != i1 and j0 != j1 for every crop": (boxes[..., 2:] != boxes[..., :2]).all()})


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(-2**63, 2**63 - 1, (), generator=generator, device=device, dtype=torch.int64))


@torch.library.custom_op("udi_kernels::stratified_sample_drawn_seed", mutates_args=())
def _with_drawn_seed(boxes: Tensor, global_grid: int, global_window: int, local_grid: int, local_window: int,
                     target_grid: int, offset: int, image_offset: int, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """seed=None under torch.compile: the seed is a host int drawn from the default generator on every call, which a
    graph cannot trace (it would become a constant); this op draws it when it runs, as eager mode does."""
    return tuple(t.clone() for t in _IMPLEMENTATIONS[backend](boxes, global_grid, global_window, local_grid,
                                                              local_window, target_grid, _draw_seed(None), offset,
                                                              image_offset))


@_with_drawn_seed.register_fake
def _with_drawn_seed_fake(boxes, global_grid, global_window, local_grid, local_window, target_grid, offset,
                          image_offset, backend):
    return _fake(boxes, global_grid, global_window, local_grid, local_window, target_grid, 0, offset, image_offset)


def _check_generator(generator, seed) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and seed is None and torch.compiler.is_compiling():
        raise ValueError("generator= is not supported under torch.compile (a torch.Generator cannot enter the "
                         "graph): pass seed=int(torch.randint(-2**63, 2**63 - 1, (), generator=generator)) drawn "
                         "outside, or leave both out (the default generator is drawn when the graph runs)")


def stratified_sample(boxes: Tensor, *, global_grid: int = 14, global_window: int = 3, local_grid: int = 6,
                      local_window: int = 2, target_grid: int = 14, seed: Optional[int] = None, offset: int = 0,
                      image_offset: int = 0, generator: Optional[torch.Generator] = None,
                      backend: Optional[str] = None, check_boxes: bool = True) -> SampledPairs:
    """Stratified random samples of every crop pair of a batch, with their bilinear targets.

    Args:
        boxes: [B, 2 + L, 4] float32 crop boxes (i0, j0, i1, j1) in normalised "ij" image
            coordinates; crops 0 and 1 are the global crops, then L local crops. j0 > j1 marks
            a horizontal flip.
        global_grid, global_window: source grid and window of the global pair (16 samples by default).
        local_grid, local_window: the same for the local crops (9 samples by default).
        target_grid: the target global crop's grid, where the bilinear taps land.
        seed, offset: the Philox key (an int in [-2**63, 2**63)) and the fourth counter word (an int in
            [0, 2**32)). With seed=None a seed is drawn from `generator` (or the default CPU generator).
            Same (seed, offset) -> same samples, bit for bit, on every backend.
        image_offset: the global index of image 0 of `boxes` (an int in [0, 2**32)): image b draws as image
            image_offset + b of a global batch (the Philox counter word, modulo 2**32), so that a data-parallel
            rank sampling its own slice boxes[i:j] with image_offset=i gets exactly rows i:j of the global
            batch's samples, without gathering the other ranks' boxes.
        backend: 'auto', 'native', 'triton' or 'reference' (default: $UDI_KERNELS_BACKEND or 'auto').
        check_boxes: check the box values (one device sync on CUDA; asserted asynchronously under
            torch.compile); shapes, dtypes and every other argument are always checked. With check_boxes=False, boxes outside [0, 1], degenerate or non-finite give
            garbage samples, but every output element is still written and nothing is read or written out of
            bounds.

    Returns:
        SampledPairs(globals=PairTaps[B, 2, Sg], locals=PairTaps[B, L, 2, Sl]).

    Raises:
        TypeError / ValueError naming the argument (e.g. a seed that is not an int, an offset or image_offset
        outside [0, 2**32), boxes of the wrong shape, dtype or values, generator= under torch.compile, where it
        cannot enter the graph: draw the seed outside); the error of backends.resolve for a backend that cannot
        run the call.

    torch.compile(fullgraph=True) traces it with its defaults (seed=None: drawn from the default generator when
    the graph runs, as in eager mode); torch.func.vmap maps it over a leading dimension of boxes.
    """
    _check_boxes(boxes)
    global_grid, global_window = _check_pattern(global_grid, global_window, "global_grid", "global_window")
    local_grid, local_window = _check_pattern(local_grid, local_window, "local_grid", "local_window")
    target_grid, _ = _check_pattern(target_grid, 1, "target_grid", "1")
    offset, image_offset = _check_word(offset, "offset"), _check_word(image_offset, "image_offset")
    _check_generator(generator, seed)
    drawn_when_run = seed is None and generator is None and torch.compiler.is_compiling()
    if not drawn_when_run:
        seed = _draw_seed(generator) if seed is None else check_int(seed, "seed")
        if not -2**63 <= seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits (signed), got {seed}")
    if check_bool(check_boxes, "check_boxes") and boxes.device.type != "meta":
        _check_box_values(boxes)
    chosen = backends.resolve(STRATIFIED_SAMPLE, boxes.device, boxes.dtype, backend, samples_per_crop=max(
        (global_grid // global_window) ** 2, (local_grid // local_window) ** 2))
    grids = (global_grid, global_window, local_grid, local_window, target_grid)
    with autocast_off(boxes.device):  # no cast: boxes are float32 (udi_kernels/ops/autocast.py)
        if drawn_when_run:
            outputs = _with_drawn_seed(boxes.contiguous(), *grids, offset, image_offset, chosen)
        else:
            outputs = _IMPLEMENTATIONS[chosen](boxes.contiguous(), *grids, seed, offset, image_offset)
    return SampledPairs(PairTaps(*outputs[:4]), PairTaps(*outputs[4:]))
