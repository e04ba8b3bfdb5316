"""stratified_sample: every backend against the reference bit for bit, an independent dense-map
construction written from UDI_SPEC §2, the sampling distribution, and argument checks."""
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

import udi_kernels
from udi_kernels import stratified_sample, taps_to_dense
from udi_kernels._native import has_native_kernel
from udi_kernels.declarations import DECLARATIONS
from udi_kernels.limits import MAX_GRID
from udi_kernels.reference.philox import philox4x32
from udi_kernels.testing.inputs import random_boxes

TRITON = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not TRITON, reason="Triton on the CPU runs only under TRITON_INTERPRET=1")

# ---------------------------------------------------------------- inputs


def nested_and_disjoint_boxes():
    """Image 0: locals nested in the globals; image 1: disjoint globals and locals outside both."""
    return torch.tensor([
        [[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1], [0.3, 0.3, 0.5, 0.5], [0.6, 0.7, 0.8, 0.4]],
        [[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0], [0.0, 0.6, 0.3, 1.0], [0.45, 0.45, 0.55, 0.55]],
    ])


GRIDS = [
    dict(),  # defaults: global 14/3, local 6/2, target 14
    dict(global_grid=13, global_window=1, local_grid=7, local_window=3, target_grid=5),
    dict(global_grid=9, global_window=2, local_grid=5, local_window=5, target_grid=9),
]


def outputs(sample):
    return [*sample.globals, *sample.locals]


def assert_bitwise(actual, expected):
    for a, e in zip(outputs(actual), outputs(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.cpu(), e.cpu())


# ---------------------------------------------------------------- the random stream


def philox_python(seed, counter):
    """Philox4x32-10 on Python ints, written from Salmon et al. (SC'11)."""
    mask = 0xFFFFFFFF
    c = list(counter)
    key = [seed & mask, (seed >> 32) & mask]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ key[0], p1 & mask, (p0 >> 32) ^ c[3] ^ key[1], p0 & mask]
        key = [(key[0] + 0x9E3779B9) & mask, (key[1] + 0xBB67AE85) & mask]
    return c


@pytest.mark.parametrize("key, counter, expected", [
    # Known-answer vectors of Random123's philox4x32-10.
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, counter, expected):
    seed = key[0] | (key[1] << 32)
    assert tuple(philox_python(seed, counter)) == expected
    words = philox4x32(seed, *(torch.tensor([c]) for c in counter))
    assert tuple(int(w) for w in words) == expected


def test_reference_philox_matches_python_on_random_counters():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    for seed in (0, 12345, 2**63 - 1, -7):
        words = torch.stack(philox4x32(seed, *counters))
        expected = [philox_python(seed, counters[:, k].tolist()) for k in range(64)]
        assert words.T.tolist() == expected


@needs_interpreter
def test_reference_philox_matches_triton_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, seed, BLOCK: tl.constexpr):
        offset = tl.arange(0, BLOCK)
        words = tl.randint4x(seed, offset)
        for k in tl.static_range(4):
            tl.store(out_ptr + k * BLOCK + offset, words[k].to(tl.int64))

    seed = 0x1234_5678_9ABC
    out = torch.empty(4 * 32, dtype=torch.int64)
    randint4x_kernel[(1,)](out, seed, BLOCK=32)
    expected = torch.stack(philox4x32(seed, torch.arange(32), 0, 0, 0))
    assert torch.equal(out.view(4, 32), expected)


# ---------------------------------------------------------------- backends agree bit for bit


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("seed", [0, 1, 987654321, -2**63])
def test_native_cpu_equals_reference(grids, seed, poison_empty):
    g = torch.Generator().manual_seed(seed & 0xFFFF)
    boxes = random_boxes(5, 4, g, flip_i=True)
    expected = stratified_sample(boxes, seed=seed, offset=7, backend="reference", **grids)
    assert_bitwise(stratified_sample(boxes, seed=seed, offset=7, backend="native", **grids), expected)


@needs_interpreter
@pytest.mark.parametrize("grids", GRIDS)
def test_triton_equals_native_cpu_over_many_seeds(grids, poison_empty):
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(3, 2, g, flip_i=True)
    for seed in torch.randint(-2**63, 2**63 - 1, (8,), generator=g).tolist():
        expected = stratified_sample(boxes, seed=seed, offset=seed & 0xFFFF, backend="native", **grids)
        assert_bitwise(stratified_sample(boxes, seed=seed, offset=seed & 0xFFFF, backend="triton", **grids), expected)


@pytest.mark.parametrize("backend", ["reference", "native", pytest.param("triton", marks=needs_interpreter)])
def test_rank_slices_equal_the_global_draw(backend, poison_empty):
    """Each data-parallel rank samples its own images with image_offset and gets its rows of the global draw."""
    g = torch.Generator().manual_seed(21)
    boxes = random_boxes(7, 3, g, flip_i=True)
    everything = stratified_sample(boxes, seed=-31, offset=5, backend=backend)
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        rank = stratified_sample(boxes[start:stop], seed=-31, offset=5, image_offset=start, backend=backend)
        assert_bitwise(rank, type(everything)(*(type(p)(*(t[start:stop] for t in p)) for p in everything)))
    # the same rule on every backend (the reference's, checked here against the kernels' wrap modulo 2**32)
    wrapped = stratified_sample(boxes, seed=-31, offset=5, image_offset=2**32 - 3, backend=backend)
    assert_bitwise(stratified_sample(boxes[3:], seed=-31, offset=5, backend=backend),
                   type(wrapped)(*(type(p)(*(t[3:] for t in p)) for p in wrapped)))


def test_no_locals_and_empty_batch():
    g = torch.Generator().manual_seed(3)
    for B, L in ((2, 0), (0, 3)):
        boxes = random_boxes(B, L, g)
        expected = stratified_sample(boxes, seed=5, backend="reference")
        assert_bitwise(stratified_sample(boxes, seed=5, backend="native"), expected)
        assert expected.locals.src_index.shape == (B, L, 2, 9)


# ---------------------------------------------------------------- independent construction from the spec


def spec_cells(grid, window, seed, offset, image, stream):
    n, spare = grid // window, grid % window
    _, _, bit_row, bit_col = philox_python(seed, (0, image, stream, offset))
    cells = []
    for s in range(n * n):
        x0, x1, _, _ = philox_python(seed, (s, image, stream, offset))
        cells.append(((bit_row & 1) * spare + (s // n) * window + x0 % window,
                      (bit_col & 1) * spare + (s % n) * window + x1 % window))
    return cells


def spec_dense_pair(src_box, tgt_box, cells, grid, target_grid):
    """Dense source one-hot [S, G*G] and target bilinear [S, Gt*Gt] maps, in float64 from the spec."""
    src_map = np.zeros((len(cells), grid * grid))
    tgt_map = np.zeros((len(cells), target_grid * target_grid))
    kept = 0
    for a, b in cells:
        pos = [src_box[0] + a / (grid - 1) * (src_box[2] - src_box[0]),
               src_box[1] + b / (grid - 1) * (src_box[3] - src_box[1])]
        lows = [min(tgt_box[0], tgt_box[2]), min(tgt_box[1], tgt_box[3])]
        highs = [max(tgt_box[0], tgt_box[2]), max(tgt_box[1], tgt_box[3])]
        if not all(lows[k] < pos[k] < highs[k] for k in range(2)):
            continue
        t = [(pos[k] - tgt_box[k]) * (target_grid - 1) / (tgt_box[k + 2] - tgt_box[k]) for k in range(2)]
        floor = [math.floor(v) for v in t]
        nxt = [min(f + 1, target_grid - 1) for f in floor]
        frac = [t[k] - floor[k] for k in range(2)]
        src_map[kept, a * grid + b] = 1
        for row, wi in ((floor[0], 1 - frac[0]), (nxt[0], frac[0])):
            for col, wj in ((floor[1], 1 - frac[1]), (nxt[1], frac[1])):
                tgt_map[kept, row * target_grid + col] += wi * wj
        kept += 1
    return src_map, tgt_map, kept


def spec_dense_all(boxes, seed, offset, global_grid=14, global_window=3, local_grid=6, local_window=2,
                   target_grid=14):
    """For every image, the maps of its pairs in output order: g0->g1, g1->g0, then l->g1, l->g0."""
    result = []
    for image, crops in enumerate(boxes.double().tolist()):
        global_cells = spec_cells(global_grid, global_window, seed, offset, image, 0)
        local_cells = spec_cells(local_grid, local_window, seed, offset, image, 1)
        pairs = [spec_dense_pair(crops[0], crops[1], global_cells, global_grid, target_grid),
                 spec_dense_pair(crops[1], crops[0], global_cells, global_grid, target_grid)]
        for local in crops[2:]:
            for target in (crops[1], crops[0]):
                pairs.append(spec_dense_pair(local, target, local_cells, local_grid, target_grid))
        result.append(pairs)
    return result


def op_dense_all(sample, global_grid=14, global_window=3, local_grid=6, local_window=2, target_grid=14):
    def dense(taps, grid):
        src = taps_to_dense(taps.src_index[..., None], (taps.tgt_weight.sum(-1, keepdim=True) > 0).double(),
                            grid * grid)
        return src, taps_to_dense(taps.tgt_index, taps.tgt_weight.double(), target_grid ** 2)

    g_src, g_tgt = dense(sample.globals, global_grid)
    l_src, l_tgt = dense(sample.locals, local_grid)
    result = []
    for image in range(g_src.shape[0]):
        pairs = [(g_src[image, q], g_tgt[image, q], int(sample.globals.count[image, q])) for q in range(2)]
        for local in range(l_src.shape[1]):
            pairs += [(l_src[image, local, q], l_tgt[image, local, q], int(sample.locals.count[image, local, q]))
                      for q in range(2)]
        result.append(pairs)
    return result


def assert_matches_spec(sample, boxes, seed, offset, **grids):
    for spec_pairs, op_pairs in zip(spec_dense_all(boxes, seed, offset, **grids), op_dense_all(sample, **grids)):
        for (spec_src, spec_tgt, spec_kept), (op_src, op_tgt, op_kept) in zip(spec_pairs, op_pairs):
            assert op_kept == spec_kept
            np.testing.assert_array_equal(op_src.numpy(), spec_src)
            # float32 positions: a few ulps, times (Gt - 1) / target size (<= 13 / 0.15) in the weights
            np.testing.assert_allclose(op_tgt.numpy(), spec_tgt, rtol=0, atol=2e-5)


@pytest.mark.parametrize("grids", GRIDS)
def test_random_boxes_match_the_spec(grids):
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(4, 3, g, flip_i=True)
    sample = stratified_sample(boxes, seed=424242, offset=3, **grids)
    assert_matches_spec(sample, boxes, 424242, 3, **grids)


def test_nested_and_disjoint_boxes_match_the_spec():
    boxes = nested_and_disjoint_boxes()
    sample = stratified_sample(boxes, seed=77)
    assert_matches_spec(sample, boxes, 77, 0)
    assert sample.locals.count[0].min() > 0        # nested locals keep samples
    assert sample.globals.count[1].sum() == 0      # disjoint globals keep none
    assert sample.locals.count[1, 0].sum() == 0    # a local outside both globals keeps none


def test_samples_on_box_edges_are_invalid():
    """Dyadic boxes on a 9-grid put samples exactly on target edges, in float32 and float64 alike."""
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.5, 0.875, 1.0, 0.375], [0.25, 0.5, 0.75, 1.0]]])
    grids = dict(global_grid=9, global_window=1, local_grid=9, local_window=1, target_grid=9)
    sample = stratified_sample(boxes, seed=3, **grids)
    assert_matches_spec(sample, boxes, 3, 0, **grids)
    # g0 -> g1: rows 0.25 + a/16 strictly inside (0.5, 1.0) need a >= 5; columns inside (0.375, 0.875) need b >= 3.
    assert int(sample.globals.count[0, 0]) == 4 * 6


def test_taps_are_well_formed():
    g = torch.Generator().manual_seed(5)
    sample = stratified_sample(random_boxes(6, 5, g), seed=9)
    for taps, grid in ((sample.globals, 14), (sample.locals, 6)):
        S = taps.src_index.shape[-1]
        valid = torch.arange(S) < taps.count[..., None]
        assert torch.allclose(taps.tgt_weight.sum(-1)[valid], torch.ones(()), atol=1e-6)
        assert (taps.tgt_weight >= 0).all() and (taps.tgt_index >= 0).all() and (taps.tgt_index < 196).all()
        assert (taps.src_index >= 0).all() and (taps.src_index < grid * grid).all()
        assert (taps.src_index[~valid] == 0).all() and (taps.tgt_weight[~valid] == 0).all()
        assert (taps.tgt_index[~valid] == 0).all()


def test_valid_samples_keep_sample_order():
    """A target containing the whole source keeps every sample, in window raster order."""
    boxes = torch.tensor([[[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 1.0, 1.0]]])
    sample = stratified_sample(boxes, seed=1, global_grid=12, global_window=3)
    rows, cols = sample.globals.src_index[0, 0] // 12, sample.globals.src_index[0, 0] % 12
    assert int(sample.globals.count[0, 0]) == 16
    assert torch.equal(rows // 3, torch.arange(16) // 4) and torch.equal(cols // 3, torch.arange(16) % 4)


# ---------------------------------------------------------------- distribution


def sample_zero_cells(grid, window, num_images, seed):
    """(row, col) of every sample of pattern 0 across many images, through the op."""
    boxes = torch.tensor([[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 1.0, 1.0]]).expand(num_images, 2, 4).contiguous()
    src = stratified_sample(boxes, seed=seed, global_grid=grid, global_window=window).globals.src_index[:, 0]
    return src // grid, src % grid


def chi_square_pvalue(observed_codes, expected_probs):
    counts = np.bincount(observed_codes, minlength=len(expected_probs))
    expected = np.asarray(expected_probs) * len(observed_codes)
    return stats.chisquare(counts, expected).pvalue


def in_window_probabilities(grid, window):
    """P(offset) of a sample inside its window's slot of width window + spare: its cell is uniform
    in the window, and the window sits at offset 0 or `spare` (the corner), each with p = 1/2 per axis."""
    spare = grid % window
    probs = np.zeros(window + spare)
    for corner in {0, spare}:
        probs[corner:corner + window] += (1 / window) / len({0, spare})
    return np.outer(probs, probs).ravel()


@pytest.mark.parametrize("grid, window", [(14, 3), (6, 2), (12, 3), (7, 2)])
def test_cells_are_uniform_and_corners_quarter(grid, window):
    n, spare = grid // window, grid % window
    rows, cols = sample_zero_cells(grid, window, 20000, seed=2024)
    expected = in_window_probabilities(grid, window)
    for s in range(n * n):
        code = (rows[:, s] - (s // n) * window) * (window + spare) + (cols[:, s] - (s % n) * window)
        assert chi_square_pvalue(code.numpy(), expected) > 1e-4, f"sample {s}"
    if spare:
        corner_code = (rows[:, 0] >= spare + window - 1).long() * 2 + (cols[:, 0] >= spare + window - 1).long()
        # Only a corner offset can put sample 0 past window - 1: P = 1/2 * 1/window per axis.
        p_far = 0.5 / window
        corner_probs = [(1 - p_far) ** 2, (1 - p_far) * p_far, p_far * (1 - p_far), p_far ** 2]
        assert chi_square_pvalue(corner_code.numpy(), corner_probs) > 1e-4


def test_chi_square_rejects_a_sampler_without_corners():
    """The distribution test can fail: cells that never use the corner offset are rejected."""
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 3, 20000), rng.integers(0, 3, 20000)
    assert chi_square_pvalue(rows * 5 + cols, in_window_probabilities(14, 3)) < 1e-6


def test_generator_and_seed():
    boxes = random_boxes(3, 2, torch.Generator().manual_seed(0))
    first = stratified_sample(boxes, generator=torch.Generator().manual_seed(5))
    again = stratified_sample(boxes, generator=torch.Generator().manual_seed(5))
    other = stratified_sample(boxes, generator=torch.Generator().manual_seed(6))
    assert_bitwise(first, again)
    assert not torch.equal(first.globals.src_index, other.globals.src_index)
    assert not torch.equal(stratified_sample(boxes, seed=1, offset=0).globals.src_index,
                           stratified_sample(boxes, seed=1, offset=1).globals.src_index)


# ---------------------------------------------------------------- registration


def test_opcheck_native():
    boxes = random_boxes(3, 2, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.udi_kernels.stratified_sample.default, (boxes, 14, 3, 6, 2, 14, 5, 1, 3))


@needs_interpreter
def test_opcheck_triton():
    boxes = random_boxes(2, 1, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.udi_kernels.stratified_sample_triton.default, (boxes, 14, 3, 6, 2, 14, 5, 1, 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=needs_interpreter)])
def test_torch_compile_traces_without_graph_break(backend):
    boxes = random_boxes(3, 2, torch.Generator().manual_seed(0))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def sample(b):
        return stratified_sample(b, seed=17, backend=backend, check_boxes=False)

    assert_bitwise(sample(boxes), stratified_sample(boxes, seed=17, backend="reference"))


def test_cuda_compiled_is_reported():
    """cuda_compiled() says whether this build has CUDA kernels: all three ops have one, or none has."""
    per_op = {op: has_native_kernel(op, "cuda") for op in DECLARATIONS}
    assert set(per_op.values()) == {udi_kernels.cuda_compiled()}, per_op
    if os.environ.get("UDI_KERNELS_EXPECT_CUDA") == "1":
        assert udi_kernels.cuda_compiled(), "this build was expected to contain the CUDA kernels"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("boxes, kwargs, error, match", [
    (torch.rand(2, 1, 4), {}, ValueError, "boxes must have shape"),
    (torch.rand(2, 3, 5), {}, ValueError, "boxes must have shape"),
    (torch.rand(2, 3, 4).double(), {}, TypeError, "boxes must be float32"),
    ([[0.0, 0.0, 1.0, 1.0]], {}, TypeError, "boxes must be a torch.Tensor"),
    (torch.full((1, 2, 4), 0.5), {}, ValueError, "degenerate"),
    (torch.tensor([[[0.0, 0.0, 1.2, 1.0], [0.1, 0.1, 0.9, 0.9]]]), {}, ValueError, r"inside \[0, 1\]"),
    (torch.tensor([[[0.0, 0.0, float("nan"), 1.0], [0.1, 0.1, 0.9, 0.9]]]), {}, ValueError, "finite"),
    (None, dict(global_grid=2, global_window=3), ValueError, "global_grid .* smaller than global_window"),
    (None, dict(local_window=0), ValueError, "local_window must be >= 1"),
    (None, dict(target_grid=1), ValueError, "target_grid must be in"),
    (None, dict(local_grid=6.0), TypeError, "local_grid must be an int"),
    (None, dict(offset=-1), ValueError, "offset must be in"),
    (None, dict(image_offset=2**32), ValueError, "image_offset must be in"),
    (None, dict(image_offset=1.0), TypeError, "image_offset must be an int"),
    (None, dict(seed=2**64), ValueError, "seed must fit"),
    (None, dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(boxes, kwargs, error, match):
    if boxes is None:
        boxes = random_boxes(2, 1, torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        stratified_sample(boxes, **kwargs)


@pytest.mark.parametrize("name", ["global_grid", "target_grid"])
def test_the_grid_limit_is_the_same_in_python_and_in_the_extension(name):
    """udi_kernels.limits.MAX_GRID is compiled into the extension (setup.py): both take MAX_GRID, both refuse one
    more, with the same words."""
    boxes = random_boxes(1, 0, torch.Generator().manual_seed(0))
    sizes = dict(global_grid=14, global_window=3, local_grid=6, local_window=2, target_grid=14)
    order = list(sizes)
    native = torch.ops.udi_kernels.stratified_sample
    for grid in (MAX_GRID, MAX_GRID + 1):
        args = {**sizes, name: grid, "global_window": MAX_GRID if name == "global_grid" else 3}
        if grid == MAX_GRID:
            assert native(boxes, *(args[k] for k in order), 0, 0, 0)[3].shape == (1, 2)
            continue
        message = rf"{name} must be in \[2, {MAX_GRID}\], got {grid}"
        with pytest.raises(RuntimeError, match=message):
            native(boxes, *(args[k] for k in order), 0, 0, 0)
        with pytest.raises(ValueError, match=message):
            stratified_sample(boxes, **args, backend="reference")


def test_native_kernel_checks_its_own_arguments():
    with pytest.raises(RuntimeError, match="boxes must be float32"):
        torch.ops.udi_kernels.stratified_sample(torch.rand(1, 2, 4).double(), 14, 3, 6, 2, 14, 0, 0, 0)
    with pytest.raises(RuntimeError, match="global_grid .* must not be smaller than global_window"):
        torch.ops.udi_kernels.stratified_sample(torch.rand(1, 2, 4), 2, 3, 6, 2, 14, 0, 0, 0)


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    boxes = random_boxes(1, 1, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run stratified_sample on cpu"):
        stratified_sample(boxes, backend="triton")


def test_environment_variable_selects_the_backend(monkeypatch):
    boxes = random_boxes(1, 1, torch.Generator().manual_seed(0))
    monkeypatch.setenv("UDI_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="UDI_KERNELS_BACKEND must be one of"):
        stratified_sample(boxes, seed=1)
    monkeypatch.setenv("UDI_KERNELS_BACKEND", "reference")
    assert_bitwise(stratified_sample(boxes, seed=1), stratified_sample(boxes, seed=1, backend="native"))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("grids", GRIDS)
def test_cuda_equals_cpu_equals_triton(grids, poison_empty):
    g = torch.Generator().manual_seed(8)
    boxes = random_boxes(64, 10, g, flip_i=True)
    for seed in torch.randint(-2**63, 2**63 - 1, (16,), generator=g).tolist():
        expected = stratified_sample(boxes, seed=seed, offset=3, image_offset=9, backend="native", **grids)
        on_gpu = boxes.cuda()
        for backend in ("native", "triton", "reference"):
            assert_bitwise(stratified_sample(on_gpu, seed=seed, offset=3, image_offset=9, backend=backend, **grids),
                           expected)


@pytest.mark.gpu
def test_cuda_bad_values_are_caught():
    boxes = torch.tensor([[[0.0, 0.0, 1.5, 1.0], [0.1, 0.1, 0.9, 0.9]]], device="cuda")
    with pytest.raises(ValueError, match=r"inside \[0, 1\]"):
        stratified_sample(boxes)



def test_the_triton_sampler_declares_its_block_limit():
    """One crop's samples fill one Triton block (at most 2**20 elements): more are refused by name on backend='triton'
    and auto runs another backend, with the same samples as native."""
    boxes = random_boxes(1, 2, torch.Generator().manual_seed(0))
    pattern = dict(global_grid=1025, global_window=1, seed=3)
    if "triton" in udi_kernels.backends.available("stratified_sample", "cpu"):
        with pytest.raises(ValueError, match=r"samples_per_crop <= 1048576 \(got 1050625\)"):
            stratified_sample(boxes, **pattern, backend="triton")
    auto = stratified_sample(boxes, **pattern)
    reference = stratified_sample(boxes, **pattern, backend="reference")
    assert torch.equal(auto.globals.src_index, reference.globals.src_index)
