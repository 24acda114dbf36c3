"""The colour-skew construction shared by ``cifar10s`` and ``fmnist-s`` (CIFAR-10S, Wang et al. 2020).

Groups: 0 = gray, 1 = colour. The sensitive attribute is *rendered*, not read: a dataset module
hands over its source images and two renderers (how to draw an image gray, how to draw it in colour)
and this module decides which image is shown how.

- **val** (*choice*, docs/protocol.md §4): ``VAL_PER_CLASS`` training images per class are held out, chosen with
  the fixed ``HOLDOUT_SEED`` so every run seed selects on the same images; each is shown twice,
  gray and colour, exactly like test.
- **train**: the remaining training images, in source order. In class c with n_c images,
  ``floor(skew * n_c)`` are gray for the first half of the classes and ``n_c - floor(skew * n_c)``
  for the second half (there gray is the minority). Which ones is drawn from the run seed.
- **test**: every test image twice, gray and colour.
- ``select_on="test"`` is the official procedure: nothing is held out and val *is* test.

Order inside val and test: all gray copies (source order), then all colour copies (same order), so
sample i and sample i + n are the same source image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from fairtune.data.base import DatasetOption, Split
from fairtune.errors import checked
from fairtune.errors import UserError

VAL_PER_CLASS = 500
# Fixed, independent of the run seed: the held-out images (and anything random in how val/test are
# rendered) must be the same for every seed, or seeds would be tuned and compared on different data.
HOLDOUT_SEED = 20_200_330
EVAL_RENDER_SEED = 20_200_331

GRAY, COLOR = 0, 1
# ITU-R 601-2 luma in PIL's fixed point (libImaging/Convert.c, L24): weights sum to 65536.
LUMA_WEIGHTS = (19595, 38470, 7471)
_LUMA_CHUNK = 8192  # images per int32 pass: bounds the temporary to ~130 MB at 32 px

def skew_option(default: float) -> DatasetOption:
    """``--skew``, as both skewed datasets declare it (with their own default)."""
    return DatasetOption(
        "skew", "--skew", checked(float, lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1"),
        "gray fraction of the gray-majority classes' training images", default=default,
    )


GrayRenderer = Callable[[torch.Tensor], torch.Tensor]
ColorRenderer = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB -> uint8 (N, 1, H, W), bit-identical to PIL's ``Image.convert('L')``.

    PIL rounds in integer arithmetic, L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16; a float
    formula would differ by one level on some pixels and the gray images would not be PIL's.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"luma expects uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
    wr, wg, wb = LUMA_WEIGHTS
    for start in range(0, len(images), _LUMA_CHUNK):
        chunk = images[start : start + _LUMA_CHUNK].to(torch.int32)
        acc = chunk[:, 0:1] * wr + chunk[:, 1:2] * wg + chunk[:, 2:3] * wb + 0x8000
        out[start : start + _LUMA_CHUNK] = (acc >> 16).to(torch.uint8)
    return out


def gray_from_rgb(images: torch.Tensor) -> torch.Tensor:
    """CIFAR-10S's gray image: PIL luma repeated on 3 channels, so the model's input shape is fixed."""
    return luma(images).expand(-1, 3, -1, -1).contiguous()


def skewed_gray_counts(class_counts: torch.Tensor, skew: float) -> torch.Tensor:
    """Number of gray images per class: floor(skew·n_c) for the first half of the classes, the rest after.

    The official code truncates (``int``); the tiny epsilon keeps float error such as
    0.29 * 100 = 28.999999999999996 from dropping an image.
    """
    skewed = torch.tensor([math.floor(skew * int(n) + 1e-9) for n in class_counts], dtype=torch.long)
    gray_majority = torch.arange(len(class_counts)) < len(class_counts) // 2
    return torch.where(gray_majority, skewed, class_counts - skewed)


def rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random rank 0..n_c-1 for every sample inside its class, so "the first k of class c" is a draw."""
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[labels[order]]
    return rank


def _both_renderings(
    images: torch.Tensor, labels: torch.Tensor, render_gray: GrayRenderer, render_color: ColorRenderer, generator: torch.Generator
) -> Split:
    n = len(labels)
    rendered = torch.cat([render_gray(images), render_color(images, generator)])
    groups = torch.cat([torch.full((n,), GRAY), torch.full((n,), COLOR)])
    return Split(rendered, labels.repeat(2), groups, sources=torch.arange(n).repeat(2))


def build_skewed_splits(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    skew: float,
    seed: int,
    select_on: Literal["val", "test"],
    num_classes: int,
    render_gray: GrayRenderer,
    render_color: ColorRenderer,
    val_per_class: int | None = None,
) -> tuple[Split, Split, Split]:
    """(train, val, test) of a colour-skewed dataset; see the module docstring for the rules.

    ``render_gray``/``render_color`` map uint8 (N, C, H, W) source images to (N, 3, H, W); the colour
    renderer gets a generator for per-image randomness (the run seed's for train, a fixed one for
    val and test). ``val_per_class`` defaults to ``VAL_PER_CLASS``, read at call time.
    """
    if not 0.0 <= skew <= 1.0:
        raise UserError(f"--skew must be within [0, 1], got {skew}")
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    test = _both_renderings(
        test_images, test_labels, render_gray, render_color, torch.Generator().manual_seed(EVAL_RENDER_SEED)
    )

    if select_on == "test":
        kept = torch.arange(len(train_labels))
        val = test
    else:
        per_class = VAL_PER_CLASS if val_per_class is None else val_per_class
        class_counts = torch.bincount(train_labels, minlength=num_classes)
        if per_class < 1 or int(class_counts.min()) <= per_class:
            raise UserError(
                f"cannot hold out {per_class} validation images per class: the smallest class has "
                f"{int(class_counts.min())} training images; use the full dataset or --select-on test"
            )
        holdout_generator = torch.Generator().manual_seed(HOLDOUT_SEED)
        held_out = rank_within_class(train_labels, holdout_generator) < per_class
        held = torch.nonzero(held_out).flatten()
        val = _both_renderings(train_images[held], train_labels[held], render_gray, render_color, holdout_generator)
        kept = torch.nonzero(~held_out).flatten()

    run_generator = torch.Generator().manual_seed(seed)
    labels = train_labels[kept]
    gray_counts = skewed_gray_counts(torch.bincount(labels, minlength=num_classes), skew)
    is_gray = rank_within_class(labels, run_generator) < gray_counts[labels]
    gray_rows, color_rows = torch.nonzero(is_gray).flatten(), torch.nonzero(~is_gray).flatten()
    images = torch.empty((len(kept), 3, *train_images.shape[2:]), dtype=torch.uint8)
    images[gray_rows] = render_gray(train_images[kept[gray_rows]])
    # Each image is rendered once, as shown; the colour renderer draws (e.g. tints) after the gray choice.
    images[color_rows] = render_color(train_images[kept[color_rows]], run_generator)
    train = Split(images, labels, torch.where(is_gray, GRAY, COLOR))
    return train, val, test
