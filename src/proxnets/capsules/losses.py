"""The CapsNet losses with the reference scaling of Sabour et al. (2017).

- Margin loss per sample: ``L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``
  with ``m+ = 0.9``, ``m- = 0.1``, ``lambda = 0.5``; averaged over the batch.
- Reconstruction loss per sample: ``scale * sum_pixels (x_rec - x)^2`` with ``scale = 0.0005`` -- a
  *sum* over pixels (a mean would be 784x weaker on MNIST); averaged over the batch.
"""

from __future__ import annotations

import torch

from proxnets.utils.validation import check_labels, check_number, check_tensor

__all__ = ["margin_loss", "reconstruction_loss"]


def margin_loss(lengths: torch.Tensor, targets: torch.Tensor, *, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """Batch mean of the margin loss; ``lengths (B, K)`` capsule lengths, ``targets (B,)`` class indices."""
    check_tensor("lengths", lengths, ndim=2, nonempty=True)  # the mean of an empty batch is NaN
    check_labels("targets", targets, lengths.shape[0], lengths.shape[1])
    m_plus = check_number("m_plus", m_plus, low=0.0, high=1.0)
    m_minus = check_number("m_minus", m_minus, low=0.0, high=1.0)
    lam = check_number("lam", lam, low=0.0)
    t = torch.nn.functional.one_hot(targets, lengths.shape[1]).to(lengths.dtype)  # (B, K)
    present = t * torch.relu(m_plus - lengths).pow(2)
    absent = lam * (1.0 - t) * torch.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, *, scale: float = 5e-4) -> torch.Tensor:
    """``scale * sum_pixels (reconstruction - images)^2`` averaged over the batch."""
    check_tensor("images", images, ndim=4, nonempty=True)  # the mean of an empty batch is NaN
    check_tensor("reconstruction", reconstruction, shape=tuple(images.shape), like=images)
    scale = check_number("scale", scale, low=0.0)
    return scale * (reconstruction - images).pow(2).flatten(1).sum(1).mean()
