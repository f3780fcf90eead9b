"""`proxnets denoise` / `proxnets deblur`: the default strengths improve PSNR on the embedded test photographs
(grey and colour), and the commands say where a trained denoiser comes from."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from proxnets.cli import main
from proxnets.data.images import natural_images, write_image
from proxnets.stable.restore import TEST_PHOTOS, deblur_image, denoise_image, save_denoiser, train_denoiser


@pytest.fixture(scope="module")
def small_denoiser():
    # a few seconds of training on photographs other than the test ones (what --train does, smaller)
    return train_denoiser(width=8, depth=2, n_patches=256, epochs=1, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def cli_denoiser():
    # exactly what `proxnets denoise/deblur --train` trains
    return train_denoiser(progress=False, log=lambda s: None)


def _photo(name: str, gray: bool, side: int = 64) -> torch.Tensor:
    img = natural_images(gray=gray, names=(name,))[name]
    h, w = img.shape[-2:]
    m = min(h, w)
    return F.interpolate(img[None, :, (h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m], size=(side, side),
                         mode="area")[0]


@pytest.mark.slow  # 2-10 min on 2 shared cores (load-dependent): the --train denoiser, 8 photographs at 128 x 128
@pytest.mark.timeout(1800)
@pytest.mark.filterwarnings("ignore::proxnets.utils.convergence.NonConvergenceWarning")
def test_default_strengths_improve_every_test_photo(cli_denoiser, tmp_path):
    cases = [(n, True) for n in TEST_PHOTOS] + [("astronaut", False), ("chelsea", False)]  # grey, then RGB
    for name, gray in cases:
        path = tmp_path / f"{name}_{gray}.png"
        write_image(path, _photo(name, gray, 128))
        d = deblur_image(path, cli_denoiser, tmp_path / "deb.png", simulate=True)  # default strength
        assert d["psnr_restored"] > d["psnr_blurred"], (name, gray, d)
        n = denoise_image(path, cli_denoiser, tmp_path / "den.png", add_noise=0.1)  # default strength
        assert n["psnr_denoised"] > n["psnr_noisy"], (name, gray, n)
        assert n["channels"] == (1 if gray else 3)


def test_commands_name_where_a_denoiser_comes_from(small_denoiser, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/reproduce/stable/averaged_denoiser.pt here
    write_image(tmp_path / "in.png", _photo("camera", True, 32))
    runner = CliRunner()
    res = runner.invoke(main, ["deblur", "in.png", "out.png", "--simulate"])
    assert res.exit_code != 0
    assert "proxnets reproduce stable" in res.output and "--train" in res.output
    save_denoiser(tmp_path / "den.pt", small_denoiser)
    res = runner.invoke(main, ["denoise", "in.png", "out.png", "--model", "den.pt", "--strength", "0.5", "--add-noise", "0.1"])
    assert res.exit_code == 0, res.output
    assert "strength 0.5" in res.output and (tmp_path / "out.png").is_file()
    res = runner.invoke(main, ["denoise", "in.png", "out.png", "--model", "den.pt", "--strength", "1.5"])
    assert res.exit_code != 0 and "strength" in res.output
