"""AD adversary loss, forward + backward through the gradient-reversal layer into the logits and
every adversary: a loop over 10 separate adversary MLPs (the official shape) vs fairtune's batched
``ClassAdversaries`` / ``ad_loss``, on the same weights. Target ≥ 5×."""

from __future__ import annotations

import torch

from _reference import per_class_ad_loss
from _timing import append_results, device, paired, time_call, verdict
from fairtune.losses import ClassAdversaries, ad_loss

BATCH, CLASSES, GROUPS, LAM = 128, 10, 2, 1.0
REPEATS, CALLS = 11, 50
TARGET = 5.0


def make_inputs(dev: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    adversaries = ClassAdversaries(CLASSES, GROUPS).to(dev, dtype)
    logits = torch.randn(BATCH, CLASSES, generator=gen, dtype=dtype).to(dev).requires_grad_(True)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(dev)
    groups = torch.randint(0, GROUPS, (BATCH,), generator=gen).to(dev)
    return adversaries, logits, labels, groups


def gradients(loss_fn, adversaries, logits, labels, groups):
    adversaries.zero_grad(set_to_none=True)
    logits.grad = None
    loss = loss_fn(logits, labels, groups, adversaries, LAM)
    loss.backward()
    return loss.detach(), [logits.grad.clone(), *(p.grad.clone() for p in adversaries.parameters())]


def check_agreement(dev: torch.device) -> str:
    notes = []
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)):
        inputs = make_inputs(dev, dtype)
        ref_value, ref_grads = gradients(per_class_ad_loss, *inputs)
        value, grads = gradients(ad_loss, *inputs)
        torch.testing.assert_close(value, ref_value, rtol=rtol, atol=atol)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        notes.append(f"{str(dtype).removeprefix('torch.')}: loss {float(value):.6g} vs {float(ref_value):.6g}")
    return "; ".join(notes) + f" (gradients of the logits and all {2 * 2 * CLASSES} adversary tensors agree too)"


def main() -> None:
    dev = device()
    agreement = check_agreement(dev)
    adversaries, logits, labels, groups = make_inputs(dev, torch.float32)

    def step(loss_fn):
        def run():
            adversaries.zero_grad(set_to_none=True)
            logits.grad = None
            loss_fn(logits, labels, groups, adversaries, LAM).backward()

        return run

    reference, ours = step(per_class_ad_loss), step(ad_loss)
    for fn in (reference, ours):
        time_call(fn, 5)
    ref, fast, ratio = paired(lambda: time_call(reference, CALLS), lambda: time_call(ours, CALLS), REPEATS)
    append_results(
        "bench_ad_loss: AD adversary loss forward + backward",
        dev,
        [
            f"B={BATCH}, {CLASSES} classes × {GROUPS} groups, adversaries logits → 32 → groups, float32; "
            f"{REPEATS} paired repeats of {CALLS} calls each.",
            f"Agreement checked first: {agreement}.",
            "",
            "| | per call, median (min–max) |",
            "|---|---|",
            f"| reference: loop over {CLASSES} adversaries | {ref.text('.3g')} s |",
            f"| fairtune `ClassAdversaries` + `ad_loss` | {fast.text('.3g')} s |",
            "",
            f"Speed-up: {verdict(ratio, TARGET)}.",
        ],
    )


if __name__ == "__main__":
    main()
