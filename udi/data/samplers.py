"""Which images each process reads in each step."""
import torch

from .datasets import EpochIndex


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Per epoch, a seeded permutation cut into global batches of `batch_size * world_size`; rank r takes the
    r-th contiguous slice of each, so ranks gathered in rank order see exactly the single-process batch.
    Incomplete global batches are dropped. A batch is a list of EpochIndex(epoch, image): the epoch set by
    set_epoch travels with the indices to the data set, in whichever process it runs."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.length, self.batch_size, self.rank, self.world_size, self.seed = length, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        for start in range(0, len(self) * global_batch, global_batch):
            first = start + self.rank * self.batch_size
            yield [EpochIndex(self.epoch, i) for i in order[first:first + self.batch_size].tolist()]
