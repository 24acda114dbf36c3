"""MFD loss, forward + backward: the per-cell loop of the official algorithm vs fairtune's
vectorised ``mfd_loss`` (B = 128, 10 classes × 2 groups, D = 256). Target ≥ 20× on CPU."""

from __future__ import annotations

import torch

from _reference import per_cell_mfd_loss
from _timing import append_results, device, paired, time_call, verdict
from fairtune.losses import mfd_loss

BATCH, CLASSES, GROUPS, DIM, LAM = 128, 10, 2, 256, 3.0
REPEATS, CALLS = 11, 20
TARGET = 20.0


def make_batch(dev: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    cells = torch.randperm(BATCH, generator=gen) % (CLASSES * GROUPS)  # every cell holds 6 or 7 samples
    labels, groups = (cells // GROUPS).to(dev), (cells % GROUPS).to(dev)
    # ReLU features, as the CNN's 256-d feature layer
    student = torch.relu(torch.randn(BATCH, DIM, generator=gen, dtype=dtype)).to(dev).requires_grad_(True)
    teacher = torch.relu(torch.randn(BATCH, DIM, generator=gen, dtype=dtype)).to(dev)
    return student, teacher, labels, groups


def value_and_grad(loss_fn, student, teacher, labels, groups):
    student.grad = None
    loss = loss_fn(student, teacher, labels, groups, CLASSES, GROUPS, LAM)
    loss.backward()
    return loss.detach(), student.grad.clone()


def check_agreement(dev: torch.device) -> str:
    """Float64 agreement of value and gradient, then float32 (the dtype timed)."""
    notes = []
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 1e-6)):
        batch = make_batch(dev, dtype)
        ref_value, ref_grad = value_and_grad(per_cell_mfd_loss, *batch)
        value, grad = value_and_grad(mfd_loss, *batch)
        torch.testing.assert_close(value, ref_value, rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)
        rel = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
        notes.append(f"{str(dtype).removeprefix('torch.')}: loss {float(value):.6g} vs {float(ref_value):.6g}, max gradient deviation {rel:.1e} of the largest")
    return "; ".join(notes)


def main() -> None:
    dev = device()
    agreement = check_agreement(dev)
    student, teacher, labels, groups = make_batch(dev, torch.float32)

    def step(loss_fn):
        def run():
            student.grad = None
            loss_fn(student, teacher, labels, groups, CLASSES, GROUPS, LAM).backward()

        return run

    reference, ours = step(per_cell_mfd_loss), step(mfd_loss)
    for fn in (reference, ours):  # warm-up: allocator, lazy CUDA kernels
        time_call(fn, 3)
    ref, fast, ratio = paired(lambda: time_call(reference, CALLS), lambda: time_call(ours, CALLS), REPEATS)
    append_results(
        "bench_mfd_loss: MFD loss forward + backward",
        dev,
        [
            f"B={BATCH}, {CLASSES} classes × {GROUPS} groups, D={DIM}, float32; {REPEATS} paired repeats of {CALLS} calls each.",
            f"Agreement checked first: {agreement}.",
            "",
            "| | per call, median (min–max) |",
            "|---|---|",
            f"| reference: per-cell loop | {ref.text('.3g')} s |",
            f"| fairtune `mfd_loss` | {fast.text('.3g')} s |",
            "",
            f"Speed-up: {verdict(ratio, TARGET)}.",
        ],
    )


if __name__ == "__main__":
    main()
