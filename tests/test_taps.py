"""Conversions between taps and the reference code's dense [S, N] maps."""
import pytest
import torch

from udi_kernels import dense_to_taps, one_hot_taps, stratified_sample, taps_to_dense


def test_taps_to_dense_adds_repeated_taps():
    index = torch.tensor([[[0, 2, 2, 5]]], dtype=torch.int32)
    weight = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    dense = taps_to_dense(index, weight, 7)
    assert torch.allclose(dense, torch.tensor([[[0.1, 0, 0.5, 0, 0, 0.4, 0]]]))


def test_dense_to_taps_round_trips_srs_targets():
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.3, 0.8, 0.95, 0.2], [0.4, 0.4, 0.6, 0.6]]])
    taps = stratified_sample(boxes, seed=3).locals
    dense = taps_to_dense(taps.tgt_index, taps.tgt_weight, 196)
    index, weight = dense_to_taps(dense)
    assert torch.allclose(taps_to_dense(index, weight, 196), dense)


def test_dense_to_taps_rejects_rows_with_too_many_nonzeros():
    dense = torch.zeros(1, 3, 10)
    dense[0, 1, :5] = 0.2
    with pytest.raises(ValueError, match="row with 5 nonzeros; at most 4"):
        dense_to_taps(dense)


def test_one_hot_taps_zero_padding():
    index, weight = one_hot_taps(torch.tensor([[4, 7, 0]], dtype=torch.int32), torch.tensor([2]))
    assert index.shape == (1, 3, 1) and weight.squeeze(-1).tolist() == [[1.0, 1.0, 0.0]]


def test_mismatched_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="index .* and weight .* must have the same shape"):
        taps_to_dense(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 3), 5)
