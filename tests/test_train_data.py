"""The epoch reaches the data-loader workers (issue 21 §9): the views of an epoch depend on (seed, epoch, index)
alone, whether the workers persist across epochs or not."""
import pytest
import torch

from udi.data import MultiCropAugmentation, ShardedBatchSampler, collate_multicrop, pretraining_dataset


def epoch_boxes(loader, sampler, epoch: int) -> torch.Tensor:
    """Every batch's boxes [B, 2 + L, 4] of one epoch, stacked."""
    sampler.set_epoch(epoch)
    return torch.stack([boxes for _, boxes in loader])


def make_loader(persistent: bool, workers: int = 2):
    augmentation = MultiCropAugmentation(local_crops_number=2, global_size=16, local_size=8)
    dataset = pretraining_dataset(None, augmentation, seed=3, embedded="images", embedded_length=8,
                                  embedded_size=32)
    sampler = ShardedBatchSampler(len(dataset), batch_size=4, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_multicrop, persistent_workers=persistent)
    return loader, sampler


@pytest.mark.parametrize("persistent", [True, False])
def test_epoch_one_crops_differ_from_epoch_zero_and_equal_a_fresh_loaders(persistent):
    loader, sampler = make_loader(persistent)
    first, second = epoch_boxes(loader, sampler, 0), epoch_boxes(loader, sampler, 1)
    assert not torch.equal(first, second), "epoch 1 repeats epoch 0's crops"
    fresh, fresh_sampler = make_loader(persistent=False)
    torch.testing.assert_close(second, epoch_boxes(fresh, fresh_sampler, 1), rtol=0, atol=0)
    in_process, in_process_sampler = make_loader(persistent=False, workers=0)
    torch.testing.assert_close(first, epoch_boxes(in_process, in_process_sampler, 0), rtol=0, atol=0)


def test_the_sampler_hands_the_epoch_with_every_index():
    sampler = ShardedBatchSampler(8, batch_size=4, seed=0)
    sampler.set_epoch(5)
    batches = list(sampler)
    assert len(batches) == 2 and all(key.epoch == 5 for batch in batches for key in batch)
    assert sorted(key.index for batch in batches for key in batch) == list(range(8))
