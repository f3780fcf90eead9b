"""Export of a fitted CCNN / DCCNN as an ordinary torch CNN (``nn.Conv2d`` layers + a linear head).

One layer of the exported network computes the estimator's features with convolutions:

- whitened, contrast-normalized patches as a ``d``-channel map: with ``W`` the ZCA matrix and ``mu``
  its mean, ``sum_i cn(x)_i W_ij = (conv(x, W_j) - m(x) sum_i W_ij) / (|x - m(x)| + eps)`` where the
  patch mean ``m`` and the centered norm come from a box convolution of ``x`` and ``x^2``; the
  ``nn.Conv2d`` ``whiten`` holds ``W_j`` as its ``d`` filters;
- the feature map ``phi`` applied per position on the channel axis; average pooling; centering;
- the recovered filters as a 1x1 ``nn.Conv2d`` ``filters`` (``D -> r``).

The last layer ends in ``nn.Linear`` ``head`` (``r P -> K``). :func:`to_torch` builds it; its output
equals ``estimator.decision_function`` (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.convex.features import PatchFeaturizer

__all__ = ["ConvexLayer", "ConvexCNN", "to_torch"]


class ConvexLayer(nn.Module):
    """Patches -> whitening conv -> ``phi`` -> pooling -> centering -> 1x1 filter conv."""

    def __init__(self, feat: PatchFeaturizer):
        super().__init__()
        c = feat.input_shape[0]
        kh, kw = feat.patch_size
        d = c * kh * kw
        self.d, self.contrast_eps = d, feat.contrast_eps
        w = feat.zca.matrix if feat.zca is not None else torch.eye(d, dtype=feat.center.dtype, device=feat.center.device)
        mu = feat.zca.mean if feat.zca is not None else torch.zeros(d, dtype=w.dtype, device=w.device)
        self.whiten = nn.Conv2d(c, d, (kh, kw), stride=feat.stride, padding=feat.padding, bias=False)
        self.whiten.weight.data.copy_(w.T.reshape(d, c, kh, kw))  # filter j = column j of W (unfold order)
        self.register_buffer("box", torch.ones(1, c, kh, kw, dtype=w.dtype, device=w.device))
        self.register_buffer("col_sum", w.sum(0).reshape(1, d, 1, 1))
        self.register_buffer("offset", (mu @ w).reshape(1, d, 1, 1))
        self.stride, self.padding, self.input_scale = feat.stride, feat.padding, feat.input_scale
        self.phi = feat.phi
        self.pool = nn.AvgPool2d(feat.pool_size, feat.pool_stride) if (feat.pool_size, feat.pool_stride) != (1, 1) else nn.Identity()
        dim = feat.dim
        self.register_buffer("center", feat.center.T.reshape(1, dim, *feat.pooled_grid).clone())
        self.scale = feat.scale
        r = feat.filters.shape[1]
        self.filters = nn.Conv2d(dim, r, 1, bias=False)
        self.filters.weight.data.copy_(feat.filters.T.reshape(r, dim, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``Z(x)`` as a map ``(N, D, Hp, Wp)``."""
        s = self.whiten(x)  # (N, d, H', W')
        if self.contrast_eps is not None:
            box = F.conv2d(x, self.box, stride=self.stride, padding=self.padding)  # patch sums (N, 1, H', W')
            sq = F.conv2d(x * x, self.box, stride=self.stride, padding=self.padding)
            mean = box / self.d
            norm = (sq - self.d * mean * mean).clamp_min(0).sqrt()
            s = (s - mean * self.col_sum) / (norm + self.contrast_eps)
        s = (s - self.offset) * self.input_scale  # (N, d, H', W') whitened patches
        f = self.phi(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, D, H', W')
        return (self.pool(f) - self.center) / self.scale  # (N, D, Hp, Wp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.filters(self.features(x))  # (N, r, Hp, Wp)


class ConvexCNN(nn.Module):
    """Stacked :class:`ConvexLayer` s and the linear head of the last one."""

    def __init__(self, layers: list[ConvexLayer], head: nn.Linear):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)  # (N, r, Hp, Wp)
        return self.head(h.flatten(1))  # (N, K)


def to_torch(estimator) -> ConvexCNN:
    """The fitted ``CCNN`` / ``DCCNN`` as a ``ConvexCNN`` (float weights, on the estimator's device)."""
    if hasattr(estimator, "featurizers_") and estimator.featurizers_ is None:  # DCCNN exact: callable kernel or layers
        raise ValueError(f"estimator: expected a model with a Conv2d form (one exact layer with a named kernel), got "
                         f"{type(estimator).__name__} with no export")
    if not hasattr(estimator, "theta_"):
        raise RuntimeError(f"{type(estimator).__name__}: call fit before to_torch")
    layers = [ConvexLayer(f) for f in estimator.featurizers_]
    head_mat = estimator.head_  # (r, K P), column k P + p
    r, kp = head_mat.shape
    n_pos = estimator.featurizers_[-1].n_positions
    k = kp // n_pos
    head = nn.Linear(r * n_pos, k, bias=False)
    # flatten order of (N, r, Hp, Wp) is j P + p; the head weight [k, j P + p] = head_[j, k P + p]
    head.weight.data.copy_(head_mat.reshape(r, k, n_pos).permute(1, 0, 2).reshape(k, r * n_pos))
    return ConvexCNN(layers, head).to(head_mat.device)
