"""bSQH (seed 002) on your own small CNN with a plain training loop: a sparse net and its certificate.

The optimizer needs a closure ``closure(backward=True) -> loss`` because it evaluates a trial point
and accepts it only if J = loss + rho * R decreases by at least eta * |u_new - u_k|^2 on that batch.
``target_density`` adapts rho until about that fraction of the weights is nonzero (exact zeros).

    PYTHONPATH=src python examples/002_bsqh.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.pmp import BSQH, DecreaseAudit, certificate, sparsity_param_groups

torch.manual_seed(0)
torch.set_num_threads(1)  # small nets: one thread is fastest on a shared CPU
ds = load_dataset("digits", seed=0)  # scikit-learn's 8x8 digits, embedded (1437 train / 360 test)

# your own network: map -> activation -> pooling, as modules (the seed's layer)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 4, 4)
    nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
)
opt = BSQH(sparsity_param_groups(model, rho=1.0),  # weights regularized, biases not
           eps=5.0, eps_min=1.0, eps_rule="curvature", target_density=0.2,
           audit=DecreaseAudit())  # recomputes J around every step for the certificate

gen = torch.Generator().manual_seed(0)
for epoch in range(15):
    perm = torch.randperm(len(ds.x_train), generator=gen)
    for i in range(0, len(perm), 64):
        xb, yb = ds.x_train[perm[i:i + 64]], ds.y_train[perm[i:i + 64]]

        def closure(backward=True):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if backward:
                loss.backward()
            return loss.detach()

        opt.step(closure)

with torch.no_grad():
    acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
sp = opt.sparsity()
info = opt.info()
print(f"test accuracy {acc:.3f}; exact zeros {sp['zeros']} of {sp['regularized']} weights "
      f"(density {1 - sp['fraction']:.3f}, target 0.2; rho adapted to {opt.param_groups[0]['rho']:.3g})")
print(f"{info.iterations} steps, {info.accepted} accepted trials, {info.rejected} rejected")
for name, frac in sp["per_layer"].items():
    print(f"  {name:10s} zeros {frac:.3f}")
for cert in certificate(model, optimizer=opt):
    print(cert.line())
