"""Seed 004 in your own code: a non-expansive block, and a firmly non-expansive denoiser inside
Plug-and-Play deblurring of a scikit-image photograph, each with its certificate.

Run: PYTHONPATH=src python examples/004_stable.py   (CPU, ~20 s; set OMP_WAIT_POLICY=PASSIVE on shared CPUs)
"""

import torch
import torch.nn.functional as F

from proxnets.data.images import natural_images
from proxnets.stable import Blur, NonExpansiveBlock, certificate, empirical_lipschitz, gaussian_kernel, lipschitz_bound, pnp_drs, psnr
from proxnets.stable.restore import train_denoiser

torch.manual_seed(0)

# 1. A non-expansive block x -> x - h A^T sigma(A x + b) in a plain nn.Sequential. Its weight is scaled
#    so that |A| = 3: the adaptive rule then takes ceil(T L |A|^2 / 2) = 5 smaller steps.
block = NonExpansiveBlock((4, 16, 16), method="heun")
with torch.no_grad():
    block.weight.mul_(3.0)
net = torch.nn.Sequential(block, NonExpansiveBlock((4, 16, 16))).eval()
x = torch.rand(8, 4, 16, 16)
bound = lipschitz_bound(net)  # rigorous: proved operator-norm bounds, not power iterations
found, _ = empirical_lipschitz(net, x, steps=30)  # gradient search for a stretched pair: a lower estimate
print(f"block steps n = {block.norm_condition()['n']}; Lipschitz bound {float(bound):.4f} (rigorous {bound.rigorous}), "
      f"largest stretch found {found:.4f}")

# 2. A small firmly non-expansive denoiser (Heun blocks, stiffness budget 2, norms valid at any size),
#    trained for a few seconds on photo patches that exclude the test photograph.
den = train_denoiser(firm=True, n_patches=256, epochs=1, progress=False, log=lambda s: None)

# 3. Douglas-Rachford PnP deblurring of 'camera' (grey, 96x96): D goes in unrelaxed, its certificate
#    (alpha <= 1/2) is what makes the iteration converge.
clean = F.interpolate(natural_images(gray=True, names=("camera",))["camera"][None], size=(96, 96), mode="area")
physics = Blur(gaussian_kernel(9, 1.6), "circular")
y = physics.A(clean) + 0.01 * torch.randn(clean.shape)
for cert in certificate(den, y):
    print(cert.line())
restored, info = pnp_drs(y, physics, den, gamma=5.0, max_iter=150, tol=1e-4, x_true=clean, with_ssim=False)
print(f"PnP-DRS: converged {info.converged} after {info.iterations} iterations (residual {info.residuals[-1]:.1e}); "
      f"PSNR blurred {psnr(y.clamp(0, 1), clean):.2f} dB -> restored {info.psnr[-1]:.2f} dB")
