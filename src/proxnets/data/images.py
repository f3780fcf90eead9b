"""Natural images for restoration, and image file I/O.

- :func:`natural_images`: the photographs that ship inside scikit-image (no download), as
  float tensors ``(C, H, W)`` in [0, 1]: the embedded test set for denoising and deblurring.
- :func:`random_patches`: seeded random crops for training denoisers.
- :func:`load_image_folder`: a BSDS500 / Set12-style directory of PNG/JPEG/BMP/TIFF images.
- :func:`read_image` / :func:`write_image`: one image file <-> ``(C, H, W)`` tensor (atomic write).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from proxnets.utils.io import atomic_path
from proxnets.utils.validation import check_int, check_tensor

__all__ = ["PHOTOS", "natural_images", "random_patches", "load_image_folder", "read_image", "write_image", "IMAGE_SUFFIXES"]

# Natural photographs shipped with scikit-image (>= 0.21) that need no download.
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "brick", "grass",
          "gravel", "clock", "hubble_deep_field", "immunohistochemistry", "cell")
COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _to_tensor(a: np.ndarray, gray: bool) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[-1] == 4:  # drop alpha
        a = a[..., :3]
    if gray and a.ndim == 3:
        a = a @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # ITU-R 709 luma, as skimage.color.rgb2gray
    if not gray and a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def natural_images(gray: bool = True, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """scikit-image's photographs as ``{name: (C, H, W) float32 in [0, 1]}`` (C = 1 if gray else 3).

    Colour mode keeps only the colour photographs unless ``names`` asks otherwise.
    """
    import skimage.data

    names = names or (PHOTOS if gray else COLOR_PHOTOS)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"names: expected photographs among {list(PHOTOS)}, got {unknown}")
    return {n: _to_tensor(getattr(skimage.data, n)(), gray) for n in names}


def random_patches(images: list[torch.Tensor] | dict[str, torch.Tensor], size: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size x size`` crops, images drawn uniformly, positions uniformly: ``(n, C, size, size)``."""
    imgs = list(images.values()) if isinstance(images, dict) else list(images)
    if not imgs:
        raise ValueError("images: expected at least one image, got none")
    check_int("size", size, low=1)
    check_int("n", n, low=1)
    small = [tuple(im.shape) for im in imgs if min(im.shape[-2:]) < size]
    if small:
        raise ValueError(f"size: expected a patch size <= every image side, got {size} for images of shapes {small}")
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(imgs), (n,), generator=g)
    out = []
    for k in which.tolist():
        im = imgs[k]
        i = int(torch.randint(im.shape[-2] - size + 1, (1,), generator=g))
        j = int(torch.randint(im.shape[-1] - size + 1, (1,), generator=g))
        out.append(im[:, i : i + size, j : j + size])
    return torch.stack(out)


MAX_IMAGE_PIXELS = 64_000_000  # per frame; a 8000 x 8000 photograph. Pillow only warns below 2x its own cap


def read_image(path: str | os.PathLike, gray: bool | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read an image file as ``(C, H, W)`` float32 in [0, 1]; ``gray`` None keeps its channels.

    Decoded by Pillow only (no fallback decoder around its checks); the declared size is checked
    against ``max_pixels`` from the header, before decoding, and Pillow's decompression-bomb
    warning is an error: an image that would need more memory than that is refused.
    """
    import warnings

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: expected an existing image file, got {str(path)!r}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"path: expected an image file with suffix in {list(IMAGE_SUFFIXES)}, got {path.name!r}")
    check_int("max_pixels", max_pixels, low=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"path: expected an image of at most {max_pixels} pixels, got "
                                     f"{w} x {h} = {w * h} in {str(path)!r} (a decompression bomb?)")
                im.load()
                a = np.asarray(im)
    except ValueError as e:
        if str(e).startswith("path: "):
            raise
        raise ValueError(f"path: expected a readable image, got {str(path)!r} ({e})") from None
    except Exception as e:  # PIL raises many types for corrupt files (incl. DecompressionBombError/Warning)
        raise ValueError(f"path: expected a readable image, got {str(path)!r} ({type(e).__name__}: {e})") from None
    if gray is None:
        gray = a.ndim == 2
    return _to_tensor(a, gray=gray)


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write ``(C, H, W)`` (C in {1, 3}) or ``(H, W)`` in [0, 1] as PNG, atomically. Values outside
    [0, 1] are an error (clip first if that is what you mean)."""
    from PIL import Image

    check_tensor("image", image, ndim=(2, 3))
    img = image.detach().cpu().float()
    if img.ndim == 3:
        if img.shape[0] not in (1, 3):
            raise ValueError(f"image: expected 1 or 3 channels (C, H, W), got shape {tuple(img.shape)}")
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    a = (img.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
    return path


def load_image_folder(folder: str | os.PathLike, gray: bool = True) -> dict[str, torch.Tensor]:
    """Every image file in ``folder`` (sorted by name) as ``{stem: (C, H, W)}``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: expected a directory of images, got {str(folder)!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder: expected image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}, got none")
    return {p.stem: read_image(p, gray=gray) for p in files}
