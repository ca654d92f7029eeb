"""Per-image augmentation of a batch: random translations (a random crop of the zero-padded
image) and horizontal flips, drawn from a ``torch.Generator`` so that a run is reproducible.

Used by teacher training and by the students' fine-tuning (``pipeline.children.kd``). Each
image gets its own offset and flip, as torchvision's ``RandomCrop(padding=...)`` and
``RandomHorizontalFlip`` give it; the batch is processed in one pass per distinct offset, so
it costs a few copies of the batch, not a Python loop over images.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "shift", "flip", "shift+flip")


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (``[N, C, H, W]``) with each image shifted and/or flipped at random.

    ``"shift"`` moves each image by up to an eighth of its side (at least one pixel) in each
    direction, filling with the background; ``"flip"`` mirrors half of the images left to right.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation {mode!r} is not one of {AUGMENTATIONS}")
    if mode == "none" or x.dim() != 4 or len(x) == 0:
        return x
    if "shift" in mode:
        x = random_shift(x, max(1, x.shape[-1] // 8), generator)
    if "flip" in mode:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image cropped at a random offset from its copy padded by ``pad`` pixels.

    The padding is each channel's lowest value in the batch, the background of normalised
    images (black), not 0, which after normalisation is the mean grey.
    """
    n, c, h, w = x.shape
    fill = x.transpose(0, 1).reshape(c, -1).min(dim=1).values
    padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    keys = offsets[:, 0] * (2 * pad + 1) + offsets[:, 1]
    for key in keys.unique().tolist():
        rows = (keys == key).nonzero().flatten()
        dy, dx = divmod(int(key), 2 * pad + 1)
        out[rows.to(x.device)] = padded[rows.to(x.device), :, dy : dy + h, dx : dx + w]
    return out
