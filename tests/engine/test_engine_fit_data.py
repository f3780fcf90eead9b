"""``fit`` on any torch Dataset or DataLoader: classification labels or regression targets."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit

CFG = dict(epochs=3, batch_size=100, lr=1e-2, schedule="cosine", progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class _Pairs(Dataset):
    """A plain map-style dataset, as a user writes one: items ``(image, int label)``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_any_dataset_trains_exactly_like_the_image_dataset(digits):
    """fit batches a Dataset from the same seeded permutation as an ImageDataset: same weights."""
    ref = fit(_mlp(), digits, TrainConfig(**CFG), log=lambda s: None).model
    test = TensorDataset(digits.x_test, digits.y_test)
    for data in (TensorDataset(digits.x_train, digits.y_train), _Pairs(digits.x_train, digits.y_train)):
        res = fit(_mlp(), data, TrainConfig(**CFG), test_data=test, log=lambda s: None)
        for a, b in zip(ref.parameters(), res.model.parameters()):
            assert torch.equal(a, b), type(data).__name__
        assert res.final["test_acc"] > 0.8 and res.final["test_loss"] < 1.0


def test_dataloader_classification(digits):
    loader = DataLoader(_Pairs(digits.x_train, digits.y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    res = fit(_mlp(), loader, TrainConfig(**CFG), test_data=DataLoader(TensorDataset(digits.x_test, digits.y_test),
                                                                       batch_size=200), log=lambda s: None)
    assert res.global_step == 3 * len(loader)  # the loader's batches, not cfg.batch_size
    assert res.final["test_acc"] > 0.8


@pytest.mark.parametrize("as_loader", [False, True], ids=["dataset", "dataloader"])
def test_denoiser_trains_on_pairs_without_labels(digits, as_loader):
    """Regression targets (clean images): the default loss is the MSE; no class labels anywhere."""
    g = torch.Generator().manual_seed(0)
    clean_tr, clean_te = digits.x_train[:600], digits.x_test[:200]
    noisy_tr = clean_tr + 0.2 * torch.randn(clean_tr.shape, generator=g)
    noisy_te = clean_te + 0.2 * torch.randn(clean_te.shape, generator=g)
    train, test = TensorDataset(noisy_tr, clean_tr), TensorDataset(noisy_te, clean_te)
    if as_loader:
        train = DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))
    res = fit(net, train, TrainConfig(epochs=6, batch_size=50, lr=1e-2, progress=False), test_data=test,
              log=lambda s: None)
    identity = float(((noisy_te - clean_te) ** 2).mean())  # the noisy input itself: 0.04
    assert "test_acc" not in res.final
    assert res.final["test_loss"] < 0.7 * identity, (res.final, identity)


def test_bad_data_is_named():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(TypeError, match="dataset: expected .*DataLoader, got Stream"):
        fit(_mlp(), Stream(), TrainConfig(**CFG))
    with pytest.raises(TypeError, match="dataset: expected .*got list"):
        fit(_mlp(), [(torch.zeros(64), 0)], TrainConfig(**CFG))
    with pytest.raises(TypeError, match=r"dataset: expected items \(input, target\)"):
        fit(_mlp(), TensorDataset(torch.zeros(4, 64)), TrainConfig(**CFG), log=lambda s: None)
    with pytest.raises(TypeError, match="test_data: expected"):
        fit(_mlp(), TensorDataset(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)), TrainConfig(**CFG),
            test_data="test.pt")
