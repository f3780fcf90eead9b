"""Shared by the pmp tests: full-batch bSQH steps on one (x, y) with the closure bSQH needs."""

import warnings

import torch.nn.functional as F


def full_batch_steps(model, opt, x, y, iterations, set_to_none=True):
    """``iterations`` bSQH steps on the whole batch (warnings of rejected steps silenced); returns ``opt``.
    ``set_to_none``: how the closure zeroes the gradients (``opt.zero_grad(set_to_none=...)``)."""

    def closure(backward=True):
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(iterations):
            opt.step(closure)
    return opt
