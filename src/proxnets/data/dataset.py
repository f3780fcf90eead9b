"""The in-memory image dataset every loader returns."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import TensorDataset

from proxnets.utils.validation import check_int, check_labels

__all__ = ["ImageDataset", "stratified_split"]


@dataclasses.dataclass
class ImageDataset:
    """Images as float32 tensors ``(N, C, H, W)`` in [0, 1] and int64 labels ``(N,)``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: list[str] = dataclasses.field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def train_set(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def test_set(self) -> TensorDataset:
        return TensorDataset(self.x_test, self.y_test)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ImageDataset":
        """A stratified, seeded subset (``None`` keeps a split whole)."""
        tr = _take(self.y_train, n_train, seed, "n_train")
        te = _take(self.y_test, n_test, seed + 1, "n_test")
        return dataclasses.replace(
            self,
            x_train=self.x_train[tr],
            y_train=self.y_train[tr],
            x_test=self.x_test[te],
            y_test=self.y_test[te],
        )

    def to(self, device: torch.device | str) -> "ImageDataset":
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"classes={self.num_classes})"
        )


def _take(y: torch.Tensor, n: int | None, seed: int, name: str) -> torch.Tensor:
    if n is None:
        return torch.arange(len(y))
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(y):
        raise ValueError(f"{name}: expected an integer in [1, {len(y)}], got {n!r}")
    first, _ = stratified_split(y, n, seed)
    return first


def stratified_split(y: torch.Tensor, n_first: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of labels ``y`` into ``n_first`` and the rest, keeping class proportions.

    Each class contributes ``round(n_first * share)`` (largest remainders fix the total), picked
    by a seeded permutation; both parts come back shuffled by the same generator.
    """
    check_labels("y", y, None)
    check_int("n_first", n_first, low=1, high=len(y))
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n_first / len(y)
    quota = exact.floor().long()
    short = n_first - int(quota.sum())
    if short > 0:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:short]] += 1
    first, rest = [], []
    for c, q in zip(classes, quota):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        first.append(idx[:q])
        rest.append(idx[q:])
    first_t, rest_t = torch.cat(first), torch.cat(rest)
    return first_t[torch.randperm(len(first_t), generator=g)], rest_t[torch.randperm(len(rest_t), generator=g)]
