"""Random inputs of the ops, for the tests and the benchmarks."""
import torch


def random_boxes(B: int, L: int, generator: torch.Generator, flip_i: bool = False) -> torch.Tensor:
    """[B, 2 + L, 4] crop boxes (i0, j0, i1, j1) of random size and place; j flipped at random (and i, if asked)."""
    size = 0.15 + 0.45 * torch.rand(B, 2 + L, 2, generator=generator)
    low = (1 - size) * torch.rand(B, 2 + L, 2, generator=generator)
    boxes = torch.cat([low, low + size], -1)
    for axis in ([1, 0] if flip_i else [1]):
        flip = torch.rand(B, 2 + L, generator=generator) < 0.5
        boxes[..., [axis, axis + 2]] = torch.where(flip[..., None], boxes[..., [axis + 2, axis]],
                                                   boxes[..., [axis, axis + 2]])
    return boxes


def random_taps(B: int, S: int, T: int, num_rows: int, device="cpu", generator=None):
    """index [B, S, T] int32 into num_rows rows and weight [B, S, T] float32 summing to 1 over T."""
    index = torch.randint(0, num_rows, (B, S, T), generator=generator, dtype=torch.int32).to(device)
    weight = torch.rand(B, S, T, generator=generator)
    return index, (weight / weight.sum(-1, keepdim=True)).to(device)
