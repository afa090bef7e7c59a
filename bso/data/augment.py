"""The released code's CIFAR augmentation, exactly (docs/parity.md).

:class:`ReleaseCIFAR10Policy` is the AutoAugment "CIFAR10 policy" the release trains with (for
CIFAR-100 too): its own implementation, which differs from torchvision's ``AutoAugment`` in the fill
colour (grey 128), the rotation (always +m degrees, no random sign, composited over grey), the
resampling (bicubic shears), the solarize thresholds and one probability. :class:`Cutout` zeroes one
16x16 hole of the [0, 1] tensor, before normalisation, so the hole comes out as ``-mean / std``.

The random draws, in order per image: the crop's top then left (``torch.randint``), the flip
(``torch.rand``), the sub-policy (``random.randint(0, 24)``), ``random.random()`` for the first
operation and, if it runs and takes a sign, ``random.choice([-1, 1])``; the same for the second
operation; Cutout's centre y then x (``np.random.randint``, NumPy's global generator). Seeded as the
release seeds them, the transform reproduces the release's images bit for bit
(tests/test_data.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)

# (p1, operation 1, magnitude index 1, p2, operation 2, magnitude index 2), in the release's order
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.8, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

# magnitude of index k (0..9) per operation (float64, as the release computes them)
MAGNITUDES = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": [0] * 10,
    "equalize": [0] * 10,
    "invert": [0] * 10,
}


def _sign() -> int:
    return random.choice([-1, 1])


def _rotate(img: Image.Image, degrees) -> Image.Image:
    """+degrees counter-clockwise (nearest), the uncovered corners grey: as the release does it."""
    rotated = img.convert("RGBA").rotate(degrees)
    grey = Image.new("RGBA", rotated.size, (128,) * 4)
    return Image.composite(rotated, grey, rotated).convert(img.mode)


def _affine(img: Image.Image, matrix, resample=Image.NEAREST) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=FILL)


# operation(img, magnitude) -> img; the signed ones draw their sign when they run
OPERATIONS = {
    "shearX": lambda img, m: _affine(img, (1, m * _sign(), 0, 0, 1, 0), Image.BICUBIC),
    "shearY": lambda img, m: _affine(img, (1, 0, 0, m * _sign(), 1, 0), Image.BICUBIC),
    "translateX": lambda img, m: _affine(img, (1, 0, m * img.size[0] * _sign(), 0, 1, 0)),
    "translateY": lambda img, m: _affine(img, (1, 0, 0, 0, 1, m * img.size[1] * _sign())),
    "rotate": _rotate,
    "color": lambda img, m: ImageEnhance.Color(img).enhance(1 + m * _sign()),
    "posterize": lambda img, m: ImageOps.posterize(img, int(m)),
    "solarize": lambda img, m: ImageOps.solarize(img, m),
    "contrast": lambda img, m: ImageEnhance.Contrast(img).enhance(1 + m * _sign()),
    "sharpness": lambda img, m: ImageEnhance.Sharpness(img).enhance(1 + m * _sign()),
    "brightness": lambda img, m: ImageEnhance.Brightness(img).enhance(1 + m * _sign()),
    "autocontrast": lambda img, m: ImageOps.autocontrast(img),
    "equalize": lambda img, m: ImageOps.equalize(img),
    "invert": lambda img, m: ImageOps.invert(img),
}


class ReleaseCIFAR10Policy:
    """The release's AutoAugment CIFAR-10 policy on a PIL RGB image: one of the 25 sub-policies
    (``random.randint(0, 24)``); its first operation runs if ``random.random() < p1``, then its second
    if ``random.random() < p2`` (the second draw happens whether or not the first ran)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        p1, op1, k1, p2, op2, k2 = CIFAR10_POLICY[random.randint(0, len(CIFAR10_POLICY) - 1)]
        if random.random() < p1:
            img = OPERATIONS[op1](img, MAGNITUDES[op1][k1])
        if random.random() < p2:
            img = OPERATIONS[op2](img, MAGNITUDES[op2][k2])
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(25 sub-policies, the released code's)"


class Cutout:
    """Zero one ``length`` x ``length`` hole of a CHW tensor, clipped at the border; its centre is
    ``y = np.random.randint(H)`` then ``x = np.random.randint(W)`` (the release's draws). Put it
    before normalisation to train what the release trains (the hole becomes ``-mean / std``)."""

    def __init__(self, length: int = 16):
        if int(length) < 1:
            raise ValueError(f"Cutout length must be >= 1, got {length}")
        self.length = int(length)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y, x = np.random.randint(h), np.random.randint(w)
        half = self.length // 2
        img = img.clone()
        img[..., max(0, y - half) : min(h, y + half), max(0, x - half) : min(w, x + half)] = 0.0
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"
