"""Shared by the pmp tests: the closure bSQH needs, and full-batch bSQH steps on one (x, y)."""

import warnings

import torch.nn.functional as F


def cross_entropy_closure(model, opt, x, y, set_to_none=True):
    """The closure bSQH's ``step`` takes: the cross-entropy of ``model`` on ``(x, y)``, back-propagated unless
    ``backward=False`` (the trial forward); ``set_to_none``: how it zeroes the gradients."""

    def closure(backward=True):
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    return closure


def full_batch_steps(model, opt, x, y, iterations, set_to_none=True):
    """``iterations`` bSQH steps on the whole batch (warnings of rejected steps silenced); returns ``opt``.
    ``set_to_none``: how the closure zeroes the gradients (``opt.zero_grad(set_to_none=...)``)."""
    closure = cross_entropy_closure(model, opt, x, y, set_to_none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(iterations):
            opt.step(closure)
    return opt
