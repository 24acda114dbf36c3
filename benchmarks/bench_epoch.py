"""One MFD training epoch (train + selection-split evaluation) on cifar10s-shaped data.

Reference, as the official code runs it: a torch DataLoader (2 workers) over a Dataset that makes a
PIL image of every sample, torchvision's RandomHorizontalFlip + ToTensor, the teacher's forward
with autograd recording, the per-cell MMD loop, ``loss.item()`` every step, float32. fairtune:
``Trainer.run_epoch`` for method ``mfd``. Both run the same 6-conv CNN, the same teacher weights and
the same balanced batches (fairtune's sampler plan), so images/s compare like for like. fairtune's
one-off set-up per run (mostly its teacher table) is timed and reported beside the epochs.

Data: CIFAR-10-format pickles written by the test fixture into a temporary folder, read by
fairtune's own cifar10s reader. Targets: ≥ 1.5× on CPU, ≥ 10× on a GPU (where the achieved
TFLOP/s of the CNN's forward and backward passes are reported against the GPU's bf16 peak).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from _reference import per_cell_mfd_loss
from _timing import Spread, append_results, cpu_time, device, interleaved, ratio, verdict, wall
from fairtune.data import DataOptions, load_dataset
from fairtune.data.sampler import balanced_plan
from fairtune.engine import Trainer, TrainConfig
from fairtune.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the fixture writer
from tests.fixtures.cifar import write_cifar10  # noqa: E402

# 700 per class, of which cifar10s holds 500 out for validation: 2,000 training images.
TRAIN_PER_CLASS, TEST_PER_CLASS, EVAL_SIZE = 700, 50, 1000
LAM, BATCH, WORKERS, REPEATS = 3.0, 128, 2, 5
TARGETS = {"cpu": 1.5, "cuda": 10.0}
# Dense bf16 tensor-core peaks (TFLOP/s, SXM parts) from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


class OfficialStyleImages(Dataset):
    """Samples as the official loaders serve them: a PIL image per item, torchvision transforms."""

    def __init__(self, split, transform) -> None:
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, as PIL wants
        self.labels, self.groups = split.labels, split.groups
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i], self.groups[i]


class ReferencePipeline:
    """The official trainer's epoch: DataLoader + PIL, teacher with autograd, per-cell MMD loop."""

    def __init__(self, data, student: torch.nn.Module, teacher: torch.nn.Module, dev: torch.device) -> None:
        info = data.info
        self.num_classes, self.num_groups, self.dev = info.num_classes, info.num_groups, dev
        self.student = copy.deepcopy(student).to(dev)
        # The official code leaves the teacher's parameters requiring grad (they are just not
        # optimised), so its forward records a graph it never uses.
        self.teacher = copy.deepcopy(teacher).to(dev).eval().requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.1, patience=10)
        self.train_set = OfficialStyleImages(data.train, transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
        self.eval_set = OfficialStyleImages(data.selection, transforms.ToTensor())
        self.labels, self.groups = data.train.labels, data.train.groups
        self.generator = torch.Generator().manual_seed(0)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=WORKERS, pin_memory=self.dev.type == "cuda", **kwargs)

    def run_epoch(self) -> int:
        """One epoch; returns the number of training images it processed."""
        plan = balanced_plan(self.labels, self.groups, self.num_classes, self.num_groups, BATCH, self.generator)
        self.student.train()
        running = 0.0
        for x, y, g in self._loader(self.train_set, batch_sampler=plan.tolist()):
            x, y, g = (t.to(self.dev, non_blocking=True) for t in (x, y, g))
            student, teacher = self.student(x), self.teacher(x)
            loss = F.cross_entropy(student.logits, y) + per_cell_mfd_loss(
                student.features, teacher.features, y, g, self.num_classes, self.num_groups, LAM
            )
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running += loss.item()  # the official trainers log a running loss every step
        self.student.eval()
        ce_sum, correct = 0.0, 0
        with torch.no_grad():
            for x, y, _ in self._loader(self.eval_set, batch_size=500):
                x, y = x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)
                logits = self.student(x).logits
                ce_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
        self.scheduler.step(ce_sum / len(self.eval_set))
        return plan.numel()


def cnn_flops(model: torch.nn.Module, batch: int, side: int, dev: torch.device) -> tuple[int, int]:
    """(FLOPs of the student's forward + backward on one training batch, of one image's forward).

    fairtune's steps run no teacher forward (its outputs come from the teacher table), so these two
    are the model arithmetic of a fairtune epoch; the loss adds a few MFLOP per step, left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(dev)
    x = torch.rand(batch, 3, side, side, device=dev)
    with FlopCounterMode(display=False) as forward_backward:
        model(x).logits.sum().backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(x)
    return forward_backward.get_total_flops(), forward.get_total_flops() // batch


def main() -> None:
    dev = device()
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp), TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0)
        data = load_dataset(DataOptions("cifar10s", seed=0, eval_size=EVAL_SIZE), tmp)
    info = data.info
    torch.manual_seed(1)
    teacher = build_model(info.model, info.num_classes, info.image_size).eval().requires_grad_(False)
    config = TrainConfig(method="mfd", epochs=50, hyperparameters={"lam": LAM}, batch_size=BATCH)
    built = {}
    setup_seconds = wall(lambda: built.update(trainer=Trainer(config, data, teacher, dev)), dev)
    trainer = built["trainer"]
    # The same run without the teacher table, to show what the table buys per epoch.
    live_teacher = Trainer(config, data, teacher, dev)
    live_teacher.teacher_table = None
    reference = ReferencePipeline(data, trainer.student, teacher, dev)
    # Every balanced plan of this split has the same shape; all pipelines train on that many images.
    steps, batch = balanced_plan(
        data.train.labels, data.train.groups, info.num_classes, info.num_groups, BATCH, torch.Generator()
    ).shape
    epochs = {"reference": reference.run_epoch, "fairtune": trainer.run_epoch, "no table": live_teacher.run_epoch}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in epochs}

    def timed(name: str):
        def measure() -> float:
            start = cpu_time()
            seconds = wall(epochs[name], dev)
            cpu_seconds[name].append(cpu_time() - start)
            return seconds

        return measure

    for name in epochs:  # warm-up: allocator, lazy kernels, first worker start-up
        timed(name)()
    for values in cpu_seconds.values():
        values.clear()
    times = interleaved({name: timed(name) for name in epochs}, REPEATS)
    cpu = {name: Spread(tuple(v)) for name, v in cpu_seconds.items()}
    speedup, cpu_speedup = ratio(times["reference"], times["fairtune"]), ratio(cpu["reference"], cpu["fairtune"])
    saved_per_epoch = times["no table"].median - times["fairtune"].median

    def row(label: str, name: str) -> str:
        rate = Spread(tuple(steps * batch / s for s in times[name].values))
        return f"| {label} | {times[name].text('.3g')} s | {rate.text('.0f')} | {cpu[name].text('.3g')} |"

    lines = [
        f"cifar10s from fixture pickles: {len(data.train)} training images (skew 0.8), selection split "
        f"{len(data.selection)} images; MFD λ={LAM:g}; {steps} balanced batches of {batch} = {steps * batch} training "
        f"images per epoch; {REPEATS} interleaved rounds after one warm-up epoch each.",
        "An epoch is training plus one evaluation pass over the selection split (as `Trainer.run_epoch`); "
        "images/s counts training images.",
        "",
        "| | epoch, median (min–max) | training images/s, median (min–max) | CPU seconds per epoch, workers included |",
        "|---|---|---|---|",
        row(f"reference: DataLoader ({WORKERS} workers) + PIL + teacher forward + per-cell loop", "reference"),
        row("fairtune `Trainer.run_epoch`", "fairtune"),
        row("fairtune without its teacher table (teacher forward every step)", "no table"),
        "",
        f"Speed-up in images/s: {verdict(speedup, TARGETS[dev.type])}. In CPU seconds, which other jobs on "
        f"shared cores disturb less: {cpu_speedup.text('.2f', '×')}.",
        f"Not in fairtune's epochs: its one-off set-up per run, {setup_seconds:.2f} s, which builds the student and the "
        f"teacher table ({len(data.train)} images × 2 flips through the teacher); the table saves "
        f"{saved_per_epoch:.2f} s per epoch here (median difference of the two fairtune rows).",
    ]
    if dev.type == "cuda":
        train_flops, eval_flops_per_image = cnn_flops(trainer.student, batch, info.image_size, dev)
        epoch_flops = steps * train_flops + len(data.selection) * eval_flops_per_image
        achieved = Spread(tuple(epoch_flops / s / 1e12 for s in times["fairtune"].values))
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        share = f" = {100 * achieved.median / peak:.2f} % of the {peak:g} TFLOP/s bf16 peak" if peak else " (no peak on file for this GPU)"
        lines.append(
            f"Achieved by fairtune: {achieved.text('.3g')} TFLOP/s{share} (FlopCounterMode: {train_flops / 1e9:.2f} GFLOP "
            "per training step for the student's forward + backward, plus the evaluation forwards)."
        )
    append_results("bench_epoch: one MFD training epoch", dev, lines)


if __name__ == "__main__":
    main()
