"""Batches as index gathers, augmentation as batched tensor ops on the training device.

No DataLoader and no per-sample Python: small datasets move to the device once as uint8; face
datasets gather rows from the decode-once memmap cache. Random augmentation parameters for a whole
epoch are drawn up front from the run's generator, which keeps runs reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fairtune.data.base import DatasetInfo, ImageView, Split
from fairtune.errors import UserError
from fairtune.registry import lookup

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UTKFACE_RESIZE = 256  # resize 256x256, then random crop (docs/protocol.md §6)
# "crop_flip" is UTKFace's recipe at any model side: show the image at 256/176 of the side the model
# sees and crop a random window of that side, so the crop keeps the same share of the image.
CROP_MARGIN = UTKFACE_RESIZE / 176
# torchvision's RandomResizedCrop defaults (docs/protocol.md §6, celeba): area fraction, aspect ratio w/h, and
# how many boxes it draws before falling back to a centre crop.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


class BatchSource:
    """One split, ready to hand out model-ready batches on ``device``."""

    def __init__(self, split: Split, info: DatasetInfo, device: torch.device) -> None:
        self.info = info
        self.device = device
        self.on_device = isinstance(split.images, torch.Tensor)
        self.images = split.images.to(device) if self.on_device else split.images
        self.labels = split.labels.to(device)
        self.groups = split.groups.to(device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def stage_plan(self, plan: torch.Tensor) -> torch.Tensor:
        """An epoch's (num_batches, batch_size) index plan where :meth:`gather` reads it.

        Data on the device gets the whole plan in one copy, so each step's gather is a pure device
        op; data read on the host (faces) keeps it on the host, where the memmap rows are taken.
        """
        return plan.to(self.device) if self.on_device else plan.cpu()

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images, labels and groups of ``index`` (a 1-D int64 tensor), all on the device."""
        if self.on_device:
            index = index.to(self.device, non_blocking=True)
            return self.images[index], self.labels[index], self.groups[index]
        host_index = index.cpu()
        # Rows land straight in pinned memory (no pageable staging copy), so the copy to the GPU
        # below is truly asynchronous and overlaps the previous step's kernels.
        rows = torch.empty((len(host_index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        _take_rows(self.images, host_index.numpy(), out=rows.numpy())
        index = host_index.pin_memory() if self.device.type == "cuda" else host_index
        index = index.to(self.device, non_blocking=True)
        return rows.to(self.device, non_blocking=True), self.labels[index], self.groups[index]

    def draw_augmentation(self, num_batches: int, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random number the epoch's augmentation needs, (num_batches, batch_size, ...) on the device."""
        params = augmentation(self.info.augment).draw((num_batches, batch_size), generator)
        return {k: v.to(self.device, non_blocking=True) for k, v in params.items()}

    def train_batch(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augmented float batch; ``params`` holds one batch's row of :meth:`draw_augmentation`."""
        x = augmentation(self.info.augment).apply(self, images.float().div_(255.0), params)
        return self._finish(x)

    def eval_batch(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        size = self.info.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self._finish(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.info.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)  # the models' layout (see engine.Trainer)

    def eval_chunks(self, batch_size: int):
        """Sequential (index) chunks covering the split once."""
        for start in range(0, len(self), batch_size):
            yield torch.arange(start, min(start + batch_size, len(self)))


def crop_flip_side(image_size: int) -> int:
    """The side "crop_flip" resizes to before cropping ``image_size`` (256 for UTKFace's 176)."""
    return round(image_size * CROP_MARGIN)


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation: ``draw(shape, generator)`` draws every random number of an epoch up
    front, (num_batches, batch_size, ...) tensors by name, so a resumed run replays them from the
    generator; ``apply(source, x, params)`` augments one float batch in [0, 1] with its row."""

    draw: Callable[[tuple[int, int], torch.Generator], dict[str, torch.Tensor]]
    apply: Callable[["BatchSource", torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _draw_flip(shape: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"flip": torch.rand(shape, generator=generator) < 0.5}


def _flip(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    flip = params["flip"][: len(x)].view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _draw_resize_crop_flip(shape, generator):
    return {**_draw_flip(shape, generator), "crop": torch.rand(*shape, 2, generator=generator)}


def _resize_crop_flip(source: "BatchSource", x: torch.Tensor, params) -> torch.Tensor:
    x = F.interpolate(x, size=(UTKFACE_RESIZE, UTKFACE_RESIZE), mode="bilinear", antialias=True, align_corners=False)
    return _flip(_crop(x, params["crop"][: len(x)], source.info.image_size), params)


def _crop_flip(source: "BatchSource", x: torch.Tensor, params) -> torch.Tensor:
    size = source.info.image_size
    side = crop_flip_side(size)
    if x.shape[-2:] != (side, side):  # a dataset can store its images at this side and skip the resize
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return _flip(_crop(x, params["crop"][: len(x)], size), params)


def _draw_random_resized_crop_flip(shape, generator):
    # Every attempt torchvision may make, drawn up front; the first box that fits is used.
    return {
        **_draw_flip(shape, generator),
        "area": torch.rand(*shape, CROP_ATTEMPTS, generator=generator),
        "log_ratio": torch.rand(*shape, CROP_ATTEMPTS, generator=generator),
        "offset": torch.rand(*shape, 2, generator=generator),
    }


AUGMENTATIONS: dict[str, Augmentation] = {
    "flip": Augmentation(_draw_flip, lambda source, x, params: _flip(x, params)),
    "resize_crop_flip": Augmentation(_draw_resize_crop_flip, _resize_crop_flip),
    "crop_flip": Augmentation(_draw_resize_crop_flip, _crop_flip),
    "random_resized_crop_flip": Augmentation(
        _draw_random_resized_crop_flip, lambda source, x, params: _flip(_random_resized_crop(x, params, source.info.image_size), params)
    ),
}


def augmentation(name: str) -> Augmentation:
    return lookup(AUGMENTATIONS, name, "augmentation")


def register_augmentation(name: str, draw: Callable, apply: Callable) -> Augmentation:
    if name in AUGMENTATIONS:
        raise UserError(f"augmentation '{name}' is already registered")
    AUGMENTATIONS[name] = Augmentation(draw, apply)
    return AUGMENTATIONS[name]


def _take_rows(images: "np.ndarray | ImageView", rows: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = images[rows]`` read from the (memory-mapped) array in one pass, no temporary."""
    if isinstance(images, ImageView):
        images, rows = images.array, images.index[rows]
    # mode="clip": numpy buffers ``out`` under the default "raise"; plan indices are in range by construction.
    np.take(images, rows, axis=0, out=out, mode="clip")


def _crop(x: torch.Tensor, unit_offsets: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample random crop of ``size`` pixels, offsets given as uniforms in [0, 1)."""
    b, _, h, w = x.shape
    top = (unit_offsets[:, 0] * (h - size + 1)).long()
    left = (unit_offsets[:, 1] * (w - size + 1)).long()
    steps = torch.arange(size, device=x.device)
    rows = (top[:, None] + steps)[:, None, :, None]
    cols = (left[:, None] + steps)[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[batch, channel, rows, cols]


def random_resized_crop_boxes(
    height: int,
    width: int,
    area_u: torch.Tensor,
    log_ratio_u: torch.Tensor,
    offset_u: torch.Tensor,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, box_h, box_w) int64 of torchvision's ``RandomResizedCrop.get_params``, for many samples at once.

    ``area_u`` and ``log_ratio_u`` are (..., attempts) uniforms in [0, 1), ``offset_u`` (..., 2).
    Attempt k draws an area fraction uniform in ``scale`` and a log aspect ratio uniform in
    log(``ratio``), rounds w = √(area·r), h = √(area/r) to integers (half to even, as Python's
    ``round``) and is accepted when it fits; the first accepted box wins and its corner is uniform
    over the positions that keep it inside. When no attempt fits, torchvision's fallback: a centre
    crop of the whole image clamped to the ratio range. Same distribution as calling ``get_params``
    once per sample, without a per-sample Python loop (the attempts are a tensor dimension).
    """
    area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u.double())
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * log_ratio_u.double())
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    accepted = fits.any(dim=-1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    box_w = torch.where(accepted, w.gather(-1, first).squeeze(-1), fallback_w)
    box_h = torch.where(accepted, h.gather(-1, first).squeeze(-1), fallback_h)
    # Uniform integer corner in [0, side - box]; float64 and the clamp keep u -> 1 from overshooting.
    top = torch.minimum((offset_u[..., 0].double() * (height - box_h + 1)).floor().long(), height - box_h)
    left = torch.minimum((offset_u[..., 1].double() * (width - box_w + 1)).floor().long(), width - box_w)
    top = torch.where(accepted, top, (height - box_h) // 2)
    left = torch.where(accepted, left, (width - box_w) // 2)
    return top, left, box_h, box_w


def _random_resized_crop(x: torch.Tensor, params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """torchvision's RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) for a whole batch at once.

    Hand-written because torchvision draws one crop per call. Boxes come from
    :func:`random_resized_crop_boxes`; each box is resized by one ``grid_sample`` whose sampling
    points are those of a bilinear ``interpolate`` of the cropped box (``align_corners=False``,
    clamped to the box's edge pixels), so no pixel outside the box leaks in. *Choice*: no antialias
    (torchvision's tensor path applies it when a box is shrunk, here by at most 218/176).
    """
    b, _, h, w = x.shape
    top, left, box_h, box_w = random_resized_crop_boxes(
        h, w, params["area"][:b], params["log_ratio"][:b], params["offset"][:b]
    )
    centres = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5

    def sample_points(start: torch.Tensor, extent: torch.Tensor, side: int) -> torch.Tensor:
        pixel = start[:, None] + centres * (extent[:, None] / size) - 0.5
        pixel = torch.minimum(torch.maximum(pixel, start[:, None].float()), (start + extent - 1)[:, None].float())
        return (2 * pixel + 1) / side - 1  # grid_sample's normalised coordinates (align_corners=False)

    ys = sample_points(top, box_h, h)
    xs = sample_points(left, box_w, w)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
