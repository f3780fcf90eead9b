"""Certification vs attack, PnP convergence with the averaged denoiser, physics proxes, PNG I/O, errors."""

import pytest
import torch

from proxnets.data.images import natural_images, write_image
from proxnets.stable import (
    AveragedDenoiser, Blur, ClassifierConfig, DenoiserConfig, Denoising, NonExpansiveClassifier, certified_accuracy,
    deblur_image, denoise_image, gaussian_kernel, lipschitz_bound, motion_kernel, pnp_admm, pnp_drs, pnp_fbs,
    robust_accuracy, save_denoiser,
)
from proxnets.stable.pnp import firmly_nonexpansive
from proxnets.utils.convergence import NonConvergenceWarning


@pytest.fixture(scope="module")
def trained_classifier():
    from proxnets.data import load_dataset
    from proxnets.engine import TrainConfig, fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0).subset(600, 200, seed=0)
    model = NonExpansiveClassifier(ClassifierConfig(in_channels=1, image_size=8, num_classes=10, width=8, stages=1, blocks_per_stage=1, head="flatten"))
    fit(model, data, TrainConfig(epochs=6, batch_size=64, lr=1e-2, progress=False, eval_every_epoch=False), log=lambda s: None)
    return model.eval(), data


@pytest.mark.filterwarnings("ignore::proxnets.stable.NormConstraintWarning")
def test_stable_certified_never_exceeds_pgd(trained_classifier):
    model, data = trained_classifier
    x, y = data.x_test, data.y_test
    L = lipschitz_bound(model)
    assert L <= 1 + 1e-4
    radii = [0.0, 0.05, 0.1, 0.2, 0.4]
    cert = certified_accuracy(model, x, y, radii, lipschitz=L)
    assert cert[0.0] > 0.5  # trained: margins are not trivially zero
    assert cert[0.1] > 0.0
    for eps in radii:
        pgd = robust_accuracy(model, x, y, eps, steps=20, restarts=2, generator=torch.Generator().manual_seed(0))
        assert cert[eps] <= pgd + 1e-12, (eps, cert[eps], pgd)
    # and the attack does something: robust accuracy falls with the radius
    assert robust_accuracy(model, x, y, 2.0, steps=20) < cert[0.0]


def _test_image(size=48):
    img = natural_images(gray=True, names=("camera",))["camera"]  # (1, 512, 512)
    img = torch.nn.functional.avg_pool2d(img[None], 8)  # (1, 1, 64, 64)
    return img[..., :size, :size].contiguous()


@pytest.mark.parametrize("boundary", ["circular", "valid"])
def test_stable_pnp_fbs_averaged_denoiser_converges(boundary):
    torch.manual_seed(0)
    den = AveragedDenoiser(DenoiserConfig(channels=1, image_size=48, width=4, depth=2, averaged_margin=0.2)).double().eval()
    x_true = _test_image().double()
    physics = Blur(gaussian_kernel(5, 1.0).double(), boundary)
    y = physics.A(x_true) + 0.01 * torch.randn_like(physics.A(x_true))
    x, info = pnp_fbs(y, physics, den, max_iter=400, tol=1e-6, x_true=x_true, with_ssim=False)
    assert info.converged and info.residuals[-1] <= 1e-6
    assert not info.diverged and info.stop_reason == "tol"
    r = torch.tensor(info.abs_residuals)  # |x_{k+1} - x_k|
    assert bool((r[1:] <= r[:-1] * (1 + 1e-6) + 1e-12).all())  # averaged iteration: nonincreasing steps
    norm2 = physics.norm(tuple(x.shape[1:])) ** 2
    fixed = den(x - info.gamma * physics.A_adjoint(physics.A(x) - y))
    assert float(((fixed - x).norm() / x.norm()).detach()) < 1e-5  # x is a fixed point of the PnP operator
    assert info.gamma == pytest.approx(1 / norm2)


def test_stable_pnp_drs_admm_converge_with_firm_denoiser():
    den = AveragedDenoiser(DenoiserConfig(channels=1, image_size=32, width=4, depth=2, averaged_margin=0.2)).double().eval()
    firm = firmly_nonexpansive(den, den.averagedness())
    x_true = _test_image(32).double()
    physics = Blur(motion_kernel(5, angle=20.0).double(), "circular")
    y = physics.A(x_true)
    for solver in (pnp_drs, pnp_admm):
        _, info = solver(y, physics, firm, gamma=1.0, max_iter=400, tol=1e-5, x_true=x_true, with_ssim=False)
        assert info.converged, solver.__name__


@pytest.mark.parametrize("physics", [Denoising(), Blur(gaussian_kernel(3, 0.8).double(), "circular"), Blur(gaussian_kernel(3, 0.8).double(), "valid")])
def test_stable_prox_data_optimality(physics):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, 10, 10, generator=g, dtype=torch.float64)
    y = physics.A(torch.randn(1, 2, 10, 10, generator=g, dtype=torch.float64))
    gamma = 0.7
    x = physics.prox_data(z, y, gamma)
    grad = (x - z) / gamma + physics.A_adjoint(physics.A(x) - y)  # first-order optimality
    assert float(grad.norm()) < 1e-6 * float(z.norm())


def test_stable_pnp_errors_and_nonconvergence():
    physics = Blur(gaussian_kernel(5, 1.0), "circular")
    y = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"gamma: expected a step in \(0, 2/\|A\|\^2"):
        pnp_fbs(y, physics, lambda v: v, gamma=2.5)
    with pytest.raises(ValueError, match="kernel: expected a kernel no larger than the image"):
        Blur(gaussian_kernel(9, 1.0)).A(torch.rand(1, 1, 5, 5))
    with pytest.raises(ValueError, match="kernel: expected odd sizes"):
        Blur(torch.ones(4, 4) / 16)
    with pytest.warns(NonConvergenceWarning, match="PnP forward-backward did not converge"):
        pnp_fbs(y, physics, lambda v: v, max_iter=2, tol=0.0)
    with pytest.raises(ValueError, match="denoiser: expected a map returning a tensor of the input shape"):
        pnp_fbs(y, physics, lambda v: v[..., :-1])


@pytest.mark.filterwarnings("ignore::proxnets.utils.convergence.NonConvergenceWarning")
def test_stable_png_commands(tmp_path):
    den = AveragedDenoiser(DenoiserConfig(channels=1, image_size=32, width=4, depth=2)).eval()
    ckpt = save_denoiser(tmp_path / "den.pt", den)
    img = _test_image(32)[0]
    write_image(tmp_path / "clean.png", img)
    out = denoise_image(tmp_path / "clean.png", ckpt, tmp_path / "den.png", add_noise=0.1)
    assert (tmp_path / "den.png").is_file() and out["psnr_noisy"] < 25
    summary = deblur_image(tmp_path / "clean.png", den, tmp_path / "deb.png", simulate=True, kernel="motion", max_iter=30)
    assert (tmp_path / "deb.png").is_file() and summary["iterations"] >= 1
    summary = deblur_image(tmp_path / "clean.png", den, tmp_path / "deb_valid.png", boundary="valid", kernel_size=5, max_iter=5, tol=0.0)
    from proxnets.data.images import read_image

    assert read_image(tmp_path / "deb_valid.png").shape[-1] == 32 + 4  # valid boundary: the estimate is larger
    # errors: not an image, wrong channel count, kernel larger than the image
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="path: expected a readable image"):
        denoise_image(tmp_path / "notes.png", den, tmp_path / "x.png")
    # a grey denoiser restores a colour image channel by channel; a colour denoiser refuses a grey image
    write_image(tmp_path / "rgb.png", torch.stack([img[0], img[0].flip(0), img[0].flip(1)]))
    denoise_image(tmp_path / "rgb.png", den, tmp_path / "rgb_den.png", add_noise=0.1)
    assert read_image(tmp_path / "rgb_den.png").shape[0] == 3
    rgb_den = AveragedDenoiser(DenoiserConfig(channels=3, image_size=32, width=4, depth=1)).eval()
    with pytest.raises(ValueError, match="path_in: expected an image with 3 channel"):
        denoise_image(tmp_path / "clean.png", rgb_den, tmp_path / "x.png")
    with pytest.raises(ValueError, match="strength"):
        deblur_image(tmp_path / "clean.png", den, tmp_path / "x.png", strength=0.0)
    with pytest.raises(ValueError, match="strength: expected a strength <= 1 / \\(2 alpha\\)"):
        deblur_image(tmp_path / "clean.png", den, tmp_path / "x.png", algorithm="drs", strength=1.0, simulate=True)
    with pytest.raises(ValueError, match="kernel: expected a kernel no larger than the image"):
        deblur_image(tmp_path / "clean.png", den, tmp_path / "x.png", kernel_size=33, kernel_sigma=3.0)
