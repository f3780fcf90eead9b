"""A routing layer inside your own nn.Sequential, trained on real digits, with its routing certificate.

Seed 000 (Ye, Li & Shen 2025): dynamic routing is mirror descent on a concave energy, so the energy never
increases along routing. ``CapsuleLinear(return_info=False)`` returns only the parent capsules (it sits in
``nn.Sequential``) and keeps the routing info on the module (``last_info``). The same layer with
``routing="regularized"`` (strictly convex: one fixed point, no polarization) is trained beside it.

Run: ``PYTHONPATH=src python examples/000_capsules.py`` (CPU, ~15 s on 2 idle cores; set OMP_WAIT_POLICY=PASSIVE on a
shared machine).
"""

import torch
from torch import nn

from proxnets.capsules import CapsuleLength, CapsuleLinear, PrimaryCapsules, layer_certificate, margin_loss
from proxnets.data import load_dataset

torch.manual_seed(0)
ds = load_dataset("mnist5k", n_train=2000, n_test=500)  # real MNIST digits shipped with the package


def capsnet(routing: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 9), nn.ReLU(),  # (B, 32, 20, 20)
        PrimaryCapsules(32, channels=8, capsule_dim=8, kernel_size=9, stride=2),  # (B, 288, 8)
        CapsuleLinear(288, 8, 10, 16, iterations=3, bias=True, routing=routing, return_info=False),  # (B, 10, 16)
        CapsuleLength(),  # class scores |v_k|, (B, 10)
    )


for routing in ("standard", "regularized"):
    torch.manual_seed(0)
    net = capsnet(routing)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(1):
        perm = torch.randperm(len(ds.x_train))
        for i in range(0, len(perm), 50):
            idx = perm[i : i + 50]
            loss = margin_loss(net(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    layer, info = net[3], net[3].last_info  # the routing info of the last forward pass
    print(f"\n{routing} routing: test accuracy {accuracy:.3f} on {len(ds.x_test)} digits; "
          f"last forward: {info.iterations} passes")
    # The certificate: the layer's votes for 16 test digits routed again in float64 (its own options).
    u = net[:3](ds.x_test[:16])  # child capsules (B, 288, 8)
    for cert in layer_certificate(layer, u, passes=10, kkt_passes=600, kkt_ratio=0.05):
        print("  " + cert.line())
