"""OptEq (seed 003): an equilibrium layer with an explicit convex objective, inside nn.Sequential.

The layer outputs z* = relu(W^T W z* + U x + b), the minimizer of
G(z; x) = sum f(z) + |z|^2/2 - |W z|^2/2 - <U x + b, z> (f = indicator of z >= 0), |W|_2 <= 0.95.
We train it with plain backward (implicit differentiation) on the embedded MNIST digits, then print
test accuracy and the certificate: the rigorous |W|_2 bound, the residual, the a-posteriori
distance to the minimizer and the objective gap.

Run: PYTHONPATH=src python examples/003_opteq.py   (CPU, ~10 s)
"""

import time

import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.opteq import OptEq, certify_equilibrium

torch.set_num_threads(1)  # many small ops in sequence: one thread is fastest on a shared CPU
torch.manual_seed(0)
ds = load_dataset("mnist5k", seed=0)  # embedded: 4000 train / 1000 test digits, 1 x 28 x 28

layer = OptEq(
    784, 64,
    activation="relu",        # prox of the indicator of z >= 0
    target_norm=0.95,         # |W|_2 <= 0.95: G is (1 - 0.95^2)-strongly convex, one equilibrium
    solver="safeguarded_anderson",  # forward (default; fixed_point | accelerated | anderson | halpern)
    tol=1e-3, max_iter=100,   # relative residual |T(z) - z| / |T(z)|
    backward="implicit",      # adjoint solve (conjugate gradient on its symmetric form)
    policy="warn",            # warn when a solve misses its tolerance
)
model = nn.Sequential(nn.Flatten(), layer, nn.Linear(64, ds.num_classes))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)

t0 = time.perf_counter()
for epoch in range(2):
    perm = torch.randperm(len(ds.x_train))
    for i in range(0, len(perm), 64):
        idx = perm[i:i + 64]
        loss = nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, last solve {layer.last_info.iterations} iterations, "
          f"adjoint {layer.last_info.backward.iterations}")

model.eval()  # freezes the norm estimate (power iteration run to convergence)
with torch.no_grad():
    acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
print(f"test accuracy {acc:.3f} after {time.perf_counter() - t0:.1f} s")

print("certificate on 256 test digits:")
for cert in certify_equilibrium(layer, ds.x_test[:256].flatten(1)):
    print("  " + cert.line())
