"""The one training loop every method runs through.

A :class:`Trainer` owns the student, its optimiser and LR scheduler, the method's trained terms
(:class:`fairtune.terms.TrainedTerm`: AD's adversaries, a plugin's state), and the generator behind
batches and augmentation; ``state_dict`` captures all of it so a run restored at an epoch boundary
continues exactly as if never stopped. It runs any method from the method's declarations alone. After each epoch it
evaluates on the selection split and hands a metrics dict to a callback (Ray Tune's reporter, or
the CLI's progress printer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fairtune import hyperparameters, losses, terms
from fairtune.data import DatasetSplits
from fairtune.data.loader import BatchSource
from fairtune.data.sampler import SAMPLERS
from fairtune.methods import Method, get_method
from fairtune.terms import Batch, TrainedTerm
from fairtune.metrics import DEFAULT_OBJECTIVE, cell_tallies, fairness_report, objective_value
from fairtune.models import ModelOutput, build_model
from fairtune.schedule import STAGE2_EPOCH, stage2_epoch

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass(frozen=True)
class TrainConfig:
    method: str
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    adv_lr: float = 3e-3  # the supplement's value (docs/protocol.md §3, `ad`)
    # name -> value, names from fairtune.hyperparameters; kept in the table's order
    hyperparameters: Mapping[str, float] = field(default_factory=dict)
    objective: str = DEFAULT_OBJECTIVE
    eval_batch_size: int = 500
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    compile: bool = False  # torch.compile the student's training forward; eager if compilation fails

    def __post_init__(self) -> None:
        given = {k: v for k, v in dict(self.hyperparameters).items() if v is not None}
        for name in given:
            hyperparameters.get(name)
        ordered = {name: float(given[name]) for name in hyperparameters.HYPERPARAMETERS if name in given}
        object.__setattr__(self, "hyperparameters", ordered)

    def __hash__(self) -> int:
        return hash(json.dumps(self.record(), sort_keys=True))

    def record(self) -> dict:
        """The stored form (records' ``config``, checkpoints): one key per field, every hyperparameter
        of the table flattened in its place (null where unused), so records stay flat and comparable."""
        out: dict = {}
        for f in fields(self):
            if f.name == "hyperparameters":
                out.update({name: self.hyperparameters.get(name) for name in hyperparameters.HYPERPARAMETERS})
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def with_hyperparameters(self, values: Mapping[str, float]) -> "TrainConfig":
        """This config with ``values`` set (a trial's sampled ones, a fixed one from a best config)."""
        return replace(self, hyperparameters={**self.hyperparameters, **values})

    @property
    def hint_epochs(self) -> int:
        """FitNet's stage 1 lasts E/2 epochs; other methods have none."""
        return self.epochs // 2 if get_method(self.method).hint_stage else 0

    @property
    def total_epochs(self) -> int:
        """FitNet runs 1.5·E epochs: E/2 of hints, then E of CE + KD."""
        return self.hint_epochs + self.epochs


# TrainConfig fields that change what a method trains (besides the method and its hyperparameters):
# runs that differ in one of them follow different protocols, so they must not share a table row,
# a table, or a teacher. eval_batch_size and compile change only how fast; objective only what a
# search selects.
PROTOCOL_FIELDS = ("epochs", "batch_size", "lr", "adv_lr", "plateau_factor", "plateau_patience")


def training_protocol(config: dict) -> dict:
    """The protocol settings of a stored config (``TrainConfig.record()``) that its method uses.

    A setting only some terms read (``adv_lr``: AD's) counts only for methods with such a term (a
    teacher never read it); a field a record predates is absent rather than assumed.
    """
    used = get_method(config["method"]).config_fields if "method" in config else None
    term_only = frozenset(f for spec in terms.TERMS.values() for f in getattr(spec, "config_fields", ()))
    return {k: config[k] for k in PROTOCOL_FIELDS if k in config and (k not in term_only or used is None or k in used)}


def same_config(stored: dict, current: dict) -> bool:
    """Stored and current ``record()`` forms agree; a hyperparameter one side lacks counts as null
    (a record written before a plugin added a row to the table)."""
    return all(stored.get(k) == current.get(k) for k in set(stored) | set(current))


@dataclass
class EpochPlan:
    """Where epoch ``index`` (0-based, over the whole run) sits in the method's schedule."""

    index: int
    stage: str  # "hint" (FitNet's stage 1) or "main"
    kd_weight: float  # annealed λ_h of Hinton KD for this epoch


def _as_float(output: ModelOutput | None) -> ModelOutput | None:
    """The model's outputs in float32 (a no-op without autocast); gradients flow through the cast."""
    return None if output is None else ModelOutput(*(None if t is None else t.float() for t in output))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Trainer:
    config: TrainConfig
    data: DatasetSplits
    teacher: nn.Module | None = None
    device: torch.device = field(default_factory=resolve_device)

    def __post_init__(self) -> None:
        self.method: Method = get_method(self.config.method)
        missing = [p for p in self.method.params if p not in self.config.hyperparameters]
        if missing:
            raise ValueError(f"method {self.method.name} needs {', '.join(missing)}")
        if self.method.needs_teacher and self.teacher is None:
            raise ValueError(f"method {self.method.name} needs a teacher")
        info = self.data.info
        self.seed = self.data.options.seed
        torch.manual_seed(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # channels_last on every device: cuDNN's tensor-core kernels want it, and on CPU oneDNN's
        # convolutions run the 6-conv CNN's training step 20–30 % faster in it (measured, torch 2.14).
        self.student = build_model(info.model, info.num_classes, info.image_size).to(self.device, memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)
        # The training forward, compiled or not; ``self.student`` stays the plain module, so state
        # dicts, evaluation and teachers made from it never carry torch.compile's wrapper.
        self._train_forward: Callable = self.student
        self._compile_unproven = False  # True until a compiled step has run forward + backward once
        if self.config.compile:
            try:
                # Batches have a fixed size, so static shapes: one graph, no dynamic-shape guards.
                self._train_forward = torch.compile(self.student, dynamic=False)
                self._compile_unproven = True
            except Exception as exc:  # e.g. a Python version dynamo does not support
                self._fall_back_to_eager(exc)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.config.lr)
        self.scheduler = self._plateau(self.optimizer)
        # Terms with state of their own, fresh at the start of the run (after the student: the same
        # draws of the global RNG initialise both on every run).
        self.trained: dict[str, TrainedTerm] = {
            use.term: use.spec(info, self.config, self.device)
            for use in self.method.terms
            if isinstance(use.spec, type) and issubclass(use.spec, TrainedTerm)
        }
        self._term_metrics: set[str] = set()  # keys the trained terms add to an evaluation
        # Resolved once, not per step: each term's name, what computes it, the hyperparameters it reads.
        hp = self.config.hyperparameters
        self._terms = [
            (use.spec.name, self.trained[use.term].loss if use.term in self.trained else use.spec,
             {name: hp[bound] for name, bound in use.bindings().items()})
            for use in self.method.terms
        ]
        self._hint = terms.get(self.method.hint_term) if self.method.hint_term else None
        self.train_source = BatchSource(self.data.train, info, self.device)
        self.selection_source = BatchSource(self.data.selection, info, self.device)
        self.teacher_table = self._build_teacher_table()
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []

    # -- schedule -----------------------------------------------------------------------------
    @property
    def hint_epochs(self) -> int:
        return self.config.hint_epochs

    @property
    def total_epochs(self) -> int:
        return self.config.total_epochs

    def plan(self, index: int) -> EpochPlan:
        stage = "hint" if index < self.hint_epochs else "main"
        kd_epoch = max(index - self.hint_epochs, 0)
        kd_weight = losses.hkd_weight(kd_epoch, self.config.epochs) if self.method.uses_kd_annealing else 0.0
        return EpochPlan(index, stage, kd_weight)

    # -- training -----------------------------------------------------------------------------
    def fit(self, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs; ``callback`` gets each epoch's metrics (after evaluation)."""
        while self.epoch < self.total_epochs:
            metrics = self.run_epoch()
            if callback is not None:
                callback(metrics)
        return self.history

    def run_epoch(self) -> dict:
        plan = self.plan(self.epoch)
        train_stats = self._train_one_epoch(plan)
        selection = self.evaluate(self.selection_source)
        if plan.stage == "main":
            self.scheduler.step(selection["loss"])
            for term in self.trained.values():
                term.end_epoch(selection)
        self.epoch += 1
        metrics = {
            "epoch": self.epoch,
            STAGE2_EPOCH: stage2_epoch(self.epoch, self.hint_epochs),  # ASHA's clock (fairtune.schedule)
            "stage": plan.stage,
            "kd_weight": plan.kd_weight,
            "lr": self.optimizer.param_groups[0]["lr"],
            **{f"train/{k}": v for k, v in train_stats.items()},
            **{k: v for k, v in selection.items() if k not in self._term_metrics},
            "objective": objective_value(
                self.config.objective, accuracy=selection["accuracy"], deo_a=selection["deo_a"], deo_m=selection["deo_m"]
            ),
            # what the trained terms measured on the selection split (AD: its adversaries' loss per class)
            **{k: v for k, v in selection.items() if k in self._term_metrics},
        }
        self.history.append(metrics)
        return metrics

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_one_epoch(self, plan: EpochPlan) -> dict[str, float]:
        info = self.data.info
        labels, groups = self.data.train.labels, self.data.train.groups
        sampler = SAMPLERS[self.method.sampler]
        index_plan = sampler(labels, groups, info.num_classes, info.num_groups, self.config.batch_size, self.generator)
        augmentation = self.train_source.draw_augmentation(*index_plan.shape, self.generator)
        self.student.train()
        for term in self.trained.values():
            term.train()
        sums: dict[str, torch.Tensor] = {}
        for step, index in enumerate(self.train_source.stage_plan(index_plan)):
            images, y, g = self.train_source.gather(index)
            params = {k: v[step] for k, v in augmentation.items()}
            x = self.train_source.train_batch(images, params)
            batch = Batch(y, g, info.num_classes, info.num_groups, plan.kd_weight)
            teacher = self._teacher_outputs(x, index, params.get("flip"))
            if self._compile_unproven:
                loss, terms = self._first_compiled_step(plan, x, teacher, batch)
            else:
                loss, terms = self._train_step(plan, x, teacher, batch)
            # Accumulated on the device: one host sync per epoch, not per step.
            for name, value in (("loss", loss), *terms.items()):
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        stats = {name: float(total) / len(index_plan) for name, total in sums.items()}
        if not math.isfinite(stats["loss"]):
            bad = ", ".join(f"{k}={v}" for k, v in stats.items() if not math.isfinite(v))
            raise NonFiniteLoss(f"training loss became non-finite in epoch {plan.index + 1} ({bad})")
        return stats

    def _build_teacher_table(self) -> torch.Tensor | None:
        """The teacher's logits and features for every training image, unflipped and flipped.

        Row 2·i + f of the (2N, classes + D) table is image i (f = 1: mirrored). Only where the
        teacher's outputs are a pure function of (image, flip) — flip-only augmentation, a frozen
        eval-mode teacher — and the method reads no teacher feature map (AT and NST need the conv
        map, 128×8×8 per image: too big to keep). Built once per run from 2N forward passes
        (cifar10s: 45,000 × 2 × 266 floats ≈ 96 MB), it replaces the teacher's forward in every step:
        an epoch is N images with the random sampler and ≈ 1.8 N with the balanced one, so the table
        has paid for itself after one to two epochs.
        """
        if (
            self.teacher is None
            or self.data.info.augment != "flip"
            or "feature_map" in self.method.teacher_outputs
        ):
            return None
        source, rows = self.train_source, []
        # no_grad, not inference_mode: losses save the teacher's features for their backward pass.
        with torch.no_grad(), self._autocast():
            for index in source.eval_chunks(self.config.eval_batch_size):
                images, _, _ = source.gather(index)
                both = []
                for flip in (False, True):
                    x = source.train_batch(images, {"flip": torch.full((len(index),), flip, device=self.device)})
                    out = self.teacher(x)
                    both.append(torch.cat([out.logits.float(), out.features.float().flatten(1)], 1))
                rows.append(torch.stack(both, 1).flatten(0, 1))
        return torch.cat(rows)

    def _teacher_outputs(self, x: torch.Tensor, index: torch.Tensor, flip: torch.Tensor) -> ModelOutput | None:
        """The frozen teacher's outputs on batch ``x`` (images ``index``, mirrored where ``flip``)."""
        if self.teacher is None:
            return None
        if self.teacher_table is not None:
            rows = self.teacher_table[index.to(self.device) * 2 + flip.long()]
            num_classes = self.data.info.num_classes
            return ModelOutput(rows[:, :num_classes], rows[:, num_classes:], None)
        with torch.no_grad(), self._autocast():
            return self.teacher(x)

    def _train_step(
        self, plan: EpochPlan, x: torch.Tensor, teacher: ModelOutput | None, batch: Batch
    ) -> tuple[torch.Tensor, dict]:
        """Forward, backward and optimiser steps on one batch; returns (loss, terms) on the device."""
        with self._autocast():
            student = self._train_forward(x)
        # Losses run in float32 outside autocast: under bf16 autocast the squared distances of MFD
        # (‖a‖² + ‖b‖² − 2a·b) and NST's Gram matrices would come from bf16 matmuls and cancel badly.
        terms = self._loss_terms(plan, _as_float(student), _as_float(teacher), batch)
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        for term in self.trained.values():
            term.zero_grad()
        loss.backward()
        self.optimizer.step()
        if plan.stage == "main":
            for term in self.trained.values():
                term.step()
        return loss, terms

    def _first_compiled_step(
        self, plan: EpochPlan, x: torch.Tensor, teacher: ModelOutput | None, batch: Batch
    ) -> tuple[torch.Tensor, dict]:
        """The first step of a compiled student, retried eagerly if compilation fails.

        torch.compile compiles lazily: the forward graph on the first call, the backward graph on
        the first backward, so a missing compiler or an unsupported op only shows here. Nothing
        has stepped by then; restoring the RNG makes the fallback run the step exactly as eager.
        """
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        try:
            result = self._train_step(plan, x, teacher, batch)
        except Exception as exc:
            self._fall_back_to_eager(exc)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            result = self._train_step(plan, x, teacher, batch)
        self._compile_unproven = False
        return result

    def _fall_back_to_eager(self, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("torch.compile failed (%s: %s); training the student eagerly", type(exc).__name__, reason[:200])
        self._train_forward = self.student
        self._compile_unproven = False

    def _loss_terms(self, plan: EpochPlan, student, teacher, batch: Batch) -> dict[str, torch.Tensor]:
        """Each term's value under its name; the student's loss is their sum."""
        if plan.stage == "hint":
            return {self._hint.name: self._hint(student, teacher, batch, {})}
        values = {"ce": F.cross_entropy(student.logits, batch.labels)} if self.method.ce else {}
        for name, compute, own in self._terms:
            values[name] = compute(student, teacher, batch, own)
        return values

    # -- evaluation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, source: BatchSource) -> dict:
        """Accuracy, DEO_A, DEO_M, acc[g,c] and mean student CE (the plateau scheduler's signal)."""
        info = self.data.info
        self.student.eval()
        correct = total = ce_sum = None
        for term in self.trained.values():
            term.eval()
        for index in source.eval_chunks(self.config.eval_batch_size):
            images, y, g = source.gather(index)
            with self._autocast():
                logits = self.student(source.eval_batch(images)).logits.float()
            c, t = cell_tallies(y, logits.argmax(1), groups=g, num_classes=info.num_classes, num_groups=info.num_groups)
            ce = F.cross_entropy(logits, y, reduction="sum")
            correct, total = (c, t) if correct is None else (correct + c, total + t)
            ce_sum = ce if ce_sum is None else ce_sum + ce
            for term in self.trained.values():
                term.observe(logits, y, g)
        report = fairness_report(correct, total)
        result = {
            "loss": float(ce_sum) / len(source),
            "accuracy": report.accuracy,
            "deo_a": report.deo_a,
            "deo_m": report.deo_m,
            "acc_matrix": report.acc_matrix,
            "cell_counts": report.cell_counts,
            "empty_cells": [list(cell) for cell in report.empty_cells],
        }
        for term in self.trained.values():
            extra = term.evaluation()
            self._term_metrics.update(extra)
            result.update(extra)
        return result

    def test_metrics(self) -> dict:
        return self.evaluate(BatchSource(self.data.test, self.data.info, self.device))

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs; loadable with ``torch.load(weights_only=True)``."""
        plan = self.plan(min(self.epoch, self.total_epochs - 1))
        state = {
            "epoch": self.epoch,
            "stage": plan.stage,
            "kd_weight": plan.kd_weight,
            "config": self.config.record(),
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.trained:
            state["terms"] = {name: term.state_dict() for name, term in self.trained.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not same_config(state["config"], self.config.record()):
            raise ValueError("checkpoint was written by a run with another configuration")
        self.epoch = int(state["epoch"])
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = json.loads(state["history"])
        for name, term in self.trained.items():
            term.load_state_dict(state["terms"][name])

    def _plateau(self, optimizer: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.config.plateau_factor, patience=self.config.plateau_patience
        )
