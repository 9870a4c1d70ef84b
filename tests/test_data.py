import pytest
import torch

from srel_fast.data import check_data_path, dataset_normalization, load_builtin
from srel_fast.errors import UserError


def test_fashion_mnist_splits():
    train, test = load_builtin("fashion-mnist", "train"), load_builtin("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    norm = dataset_normalization(train)
    assert abs(norm.mean[0] - 0.286) < 0.002 and abs(norm.std[0] - 0.353) < 0.002


def test_digits_split_is_stratified_and_seeded():
    a, b = load_builtin("digits", "train", seed=1), load_builtin("digits", "train", seed=1)
    t = load_builtin("digits", "test", seed=1)
    assert torch.equal(a.images, b.images)
    assert len(a) + len(t) == 1797 and a.images.shape[1:] == (1, 8, 8)
    frac = torch.bincount(t.labels).float() / (torch.bincount(t.labels) + torch.bincount(a.labels)).float()
    assert torch.all((frac - 0.25).abs() < 0.01)  # each class split 75/25
    assert not torch.equal(load_builtin("digits", "train", seed=2).labels, a.labels)


def test_bad_data_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_data_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no class folders"):
        check_data_path(str(tmp_path))
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="is empty"):
        check_data_path(str(tmp_path))
    with pytest.raises(UserError, match="unknown split"):
        load_builtin("digits", "val")
