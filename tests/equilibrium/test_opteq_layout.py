"""Memory layout of the conv OptEq solve (``channels_last``): a speed choice that must not change the math.

Checked: the same equilibrium and the same implicit gradients as the default layout (float64, to round-off),
the iterates really in channels-last order, and the solvers' per-sample norms and dot products correct
for channels-last and mixed-layout tensors (their memory-order views)."""

import torch

from proxnets.equilibrium import OptEqConv2d
from proxnets.solvers import _batch_dot, _norms


def test_channels_last_solve_equals_the_default_layout():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    outs = []
    for cl in (False, True):
        torch.manual_seed(1)
        layer = OptEqConv2d(2, 4, (6, 5), tol=1e-12, max_iter=500, backward_tol=1e-12, backward_max_iter=500,
                            channels_last=cl, policy="raise").double()
        z = layer(x)
        assert z.is_contiguous(memory_format=torch.channels_last) == cl and z.is_contiguous() != cl
        grads = torch.autograd.grad(z.pow(2).sum(), [*layer.parameters()])
        assert layer.last_info.converged and layer.last_info.backward.converged
        outs.append((z.detach().contiguous(), grads))
    (z0, g0), (z1, g1) = outs
    assert float((z0 - z1).norm() / z0.norm()) < 1e-10
    for a, b in zip(g0, g1):
        assert float((a - b).norm()) <= 1e-8 * max(1.0, float(a.norm()))


def test_norms_and_dots_read_channels_last_tensors_correctly():
    a = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    b = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    ref_dot = (a * b).sum(dim=(1, 2, 3))
    ref_norm = a.pow(2).sum(dim=(1, 2, 3)).sqrt()
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    assert torch.allclose(_norms(cl(a)), ref_norm, rtol=1e-12)
    for x, y in ((cl(a), cl(b)), (cl(a), b), (a, cl(b)), (a, b)):
        assert torch.allclose(_batch_dot(x, y), ref_dot, rtol=1e-12)
