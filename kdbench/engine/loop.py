"""The one shared training loop. Every method, and teacher fine-tuning, runs through ``train``.

Per step (readable top to bottom)::

    batch  = task.transform(next training batch)              # on device, augmented if the task says so
    rule.step(ctx)                                            # the teacher-update rule (may change the teacher)
    t_out  = teacher cache[batch.index] or teacher(batch)     # no grad, eval mode
    s_out  = student(batch)                                   # train mode
    terms  = loss(s_out, t_out, batch)                        # {"ce": ..., "kd": ...}
    sum(terms).backward(); clip; optimizer.step(); scheduler.step()

Randomness comes only from explicit generators: the epoch permutation from
``seed_for(seed, "order", epoch)``, augmentation and the rule from their own generators, whose
states are checkpointed, so a resumed cell continues bit-identically on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdbench.contract.rules import Artifacts, DistillLoss, StepContext, TeacherUpdate
from kdbench.contract.spec import TrainConfig
from kdbench.contract.tensors import TaskData
from kdbench.contract.types import Batch, KDModel, ModelOutput, Task
from kdbench.engine.diagnostics import TeacherProbe
from kdbench.engine.evaluation import evaluate, teacher_cache
from kdbench.engine.training import (
    Diverged,
    Progress,
    SplitQuiz,
    autocast_factory,
    cpu_bf16_kernels,
    generator,
    init_output_bias,
    make_optimizer,
    make_scheduler,
    seed_for,
    transform,
)


@dataclass
class LoopState:
    """Everything a resumed cell needs besides model/optimizer weights."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    train_seconds: float = 0.0
    samples: int = 0


@dataclass
class Loop:
    """One cell's training: models, loss, rule and data wired together."""

    task: Task
    data: TaskData
    student: KDModel
    teacher: KDModel | None
    loss: DistillLoss
    rule: TeacherUpdate
    cfg: TrainConfig
    seed: int
    device: torch.device
    log: Callable[[int, dict[str, float]], None]
    checkpoint: Callable[[Loop], None] | None = None
    cache_teacher: bool = False
    pretrained_teacher: Callable[[], KDModel] | None = None  # StepContext.pretrained_teacher
    artifacts: Artifacts | None = None  # StepContext.artifacts
    state: LoopState = field(default_factory=LoopState)
    pending_rule_state: dict[str, Any] | None = None  # restored after rule.prepare() on resume
    keep_best: bool = False  # keep a copy of the student's weights at the best epoch (teachers)
    desc: str = ""  # progress-bar label (a bar is shown when stderr is a terminal)
    best_weights: dict[str, Tensor] | None = None
    probe: TeacherProbe | None = None  # the live teacher against its start (set in __post_init__)

    def __post_init__(self) -> None:
        self.autocast = autocast_factory(self.device, self.cfg.precision)
        #: around everything the loop computes (backward passes included): bf16 products as fp32
        #: GEMMs on a CPU without bf16 kernels (:class:`~kdbench.engine.training.Bf16GemmInFp32`)
        self.kernels = lambda: cpu_bf16_kernels(self.device, self.cfg.precision)
        self.train_split = self.data.splits["train"]
        self.steps_per_epoch = self.train_split.num_batches(self.cfg.batch_size)
        self.epochs = int(self.loss.num_epochs(self.cfg.epochs))  # train.epochs, or a staged loss's budget
        self.total_steps = self.steps_per_epoch * self.epochs
        if self.cfg.max_steps:
            self.total_steps = min(self.total_steps, self.cfg.max_steps)
        if self.cfg.label_mean_bias and self.task.is_regression:  # a resumed cell restores its weights later
            self.log(0, {"init/label_mean_bias": init_output_bias(self.student, self.train_split.tensors["labels"])})
        named = list(self.student.named_parameters()) + [
            (f"loss.{n}", p) for n, p in self.loss.named_parameters()]
        self.opt = make_optimizer([p for _, p in named], named, self.cfg, self.device)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]  # clipped every step
        self.stages = tuple(self.loss.stages(self.epochs))
        self.sched = make_scheduler(self.opt, self.cfg, self.steps_per_epoch, self.total_steps, self.stages)
        self.aug_gen = generator(seed_for(self.seed, "augment"), self.device)
        self.rule_gen = generator(seed_for(self.seed, "rule"), self.device)
        quiz = self.data.splits.get("quiz")
        self.quiz = (SplitQuiz(quiz, self.task, self.cfg.batch_size, self.seed, self.device)
                     if quiz is not None and len(quiz) and self.rule.needs_quiz else None)
        want = set(self.loss.needs)
        self.ctx = StepContext(
            teacher=self.teacher, student=self.student, loss=self.loss,  # type: ignore[arg-type]
            student_opt=self.opt, task=self.task, data=self.data, quiz=self.quiz,
            generator=self.rule_gen, device=self.device, train=self.cfg,
            total_steps=self.total_steps, want=frozenset(want), autocast=self.autocast,
            pretrained_teacher=self.pretrained_teacher, artifacts=self.artifacts)
        self.tcache: dict[str, Tensor] | None = None
        # the starting teacher: captured here, before a resumed cell loads its checkpointed teacher
        if self.teacher is not None:
            with self.kernels():
                self.probe = TeacherProbe(self.teacher, self.task, self.data, self.cfg.eval_batch_size,
                                          self.device, self.autocast)

    # -- the step ------------------------------------------------------------------------------
    def teacher_out(self, batch: Batch) -> ModelOutput | None:
        """Teacher outputs for ``batch``: cached by example index, or a live no-grad forward."""
        if self.teacher is None or not self.loss.uses_teacher:
            return None
        if self.tcache is not None:
            idx = batch.index
            cls = self.tcache.get("cls")
            return ModelOutput(self.tcache["logits"][idx], cls=cls[idx] if cls is not None else None)
        with self.autocast():
            return self.ctx.teacher_forward(batch.inputs)

    def train_step(self, batch: Batch) -> dict[str, Tensor]:
        """One student optimizer step (with gradient accumulation over micro-batches)."""
        ctx = self.ctx
        ctx.batch, ctx.step, ctx.epoch = batch, self.state.step, self.state.epoch
        rule_metrics = self.rule.step(ctx)
        self.student.train()
        self.opt.zero_grad(set_to_none=True)
        micro = self.cfg.micro_batch_size or len(batch)
        terms_sum: dict[str, Tensor] = {}
        for lo in range(0, len(batch), micro):
            part = _slice(batch, lo, lo + micro)
            t_out = self.teacher_out(part)
            with self.autocast():
                s_out = self.student(part.inputs, want=ctx.want)
                terms = self.loss(s_out, t_out, part)
            scale = len(part) / len(batch)
            total = sum(terms.values()) * scale
            total.backward()  # type: ignore[union-attr]
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0) + v.detach().float() * scale
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.opt.step()
        self.sched.step()
        out = {f"loss/{k}": v for k, v in terms_sum.items()}
        out["loss/total"] = sum(terms_sum.values())  # type: ignore[assignment]
        out["grad_norm"] = norm.detach()
        for k, v in rule_metrics.items():
            out[k] = torch.as_tensor(v)
        return out

    # -- epochs --------------------------------------------------------------------------------
    def run(self) -> LoopState:
        """Train from ``state`` to the end, evaluating after every epoch."""
        with self.kernels():
            return self._run()

    def _run(self) -> LoopState:
        st, cfg = self.state, self.cfg
        self.ctx.batch, self.ctx.step, self.ctx.epoch = None, st.step, st.epoch  # resume point
        self.ctx.resuming = self.pending_rule_state is not None
        progress = self.ctx.progress = Progress(self.desc or "train")
        self.log(st.step, {f"prepare/{k}": v for k, v in self.rule.prepare(self.ctx).items()})
        if self.pending_rule_state is not None:
            self.rule.load_state_dict(self.pending_rule_state)
            self.pending_rule_state = None
        if self.cache_teacher and self.teacher is not None:
            self.tcache = teacher_cache(self.teacher, self.task, self.train_split,
                                        self.ctx.want, cfg, self.device, self.autocast)
        acc: dict[str, Tensor] = {}  # per key: the sum over the window's steps that reported it, and their count
        nacc: dict[str, int] = {}
        progress(st.step, self.total_steps)
        while st.epoch < self.epochs and not self._capped():
            self.loss.begin_epoch(st.epoch, self.epochs)
            if st.epoch in self.stages and st.batch_in_epoch == 0:
                self.opt.state.clear()  # a new stage starts with fresh AdamW moments (idempotent on resume)
            gen = generator(seed_for(self.seed, "order", st.epoch))
            order = torch.randperm(len(self.train_split), generator=gen)
            if cfg.length_bucketing:
                order = self.train_split.bucketed(order, cfg.batch_size, cfg.length_bucketing, gen)
            t0 = time.perf_counter()
            for batch in self.train_split.batches(cfg.batch_size, order=order, start=st.batch_in_epoch):
                batch = transform(self.task, batch, train=True, gen=self.aug_gen, device=self.device)
                metrics = self.train_step(batch)
                st.step += 1
                st.batch_in_epoch += 1
                st.samples += len(batch)
                progress(st.step, self.total_steps)
                for k, v in metrics.items():
                    gauge = k in self.rule.gauges  # a running total: keep the latest value
                    acc[k] = v if gauge else acc.get(k, 0) + v
                    nacc[k] = 1 if gauge else nacc.get(k, 0) + 1
                if st.step % cfg.log_every == 0 or self._capped():
                    self._flush(acc, nacc)
                    acc, nacc = {}, {}
                if self.checkpoint and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                    st.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.checkpoint(self)
                if self._capped():
                    break
            if acc:
                self._flush(acc, nacc)
                acc, nacc = {}, {}
            st.train_seconds += time.perf_counter() - t0
            self._end_epoch()
            if self.checkpoint and not self._capped():
                self.checkpoint(self)
        progress.close()
        return st

    def _end_epoch(self) -> None:
        """Evaluate the student (and probe a live teacher), keep the best epoch, move on."""
        st, cfg = self.state, self.cfg
        scores = evaluate(self.student, self.task, self.data, cfg, self.device, self.autocast)
        teacher_now = self.probe.measure(self.teacher) if self.probe and self.teacher else {}
        st.history.append({"epoch": float(st.epoch), **scores, **teacher_now})
        self.log(st.step, {f"eval/{k}": v for k, v in {**scores, **teacher_now}.items()})
        key = self.selection_key()
        if st.best_epoch < 0 or self._better(scores[key], st.best[key]):
            st.best, st.best_epoch = scores, st.epoch
            if self.keep_best:
                self.best_weights = {k: v.detach().to("cpu", copy=True)
                                     for k, v in self.student.state_dict().items()}
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0

    def selection_key(self) -> str:
        """``split/metric`` that selects the best epoch: ``train.select``, else the held-out split
        when the task carves one, else the task's first eval split."""
        split = self.cfg.select or ("heldout" if "heldout" in self.data.splits else self.task.eval_splits[0])
        return f"{split}/{self.task.metrics[0]}"

    def summary(self) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """``(metrics, protocol)`` of the run so far.

        ``metrics``: ``best`` (the epoch the selection split chose, every split), ``best_on_dev``
        (the epoch with the best primary metric on the first eval split: the GLUE convention,
        optimistic when that split is also reported) and ``last``; ``teacher/...`` keys excluded.
        """
        st = self.state
        hist = [{k: v for k, v in h.items() if not k.startswith("teacher/")} for h in st.history]
        dev_key = f"{self.task.eval_splits[0]}/{self.task.metrics[0]}"
        on_dev: dict[str, float] = {}
        for h in hist:
            if dev_key in h and (not on_dev or self._better(h[dev_key], on_dev[dev_key])):
                on_dev = h
        strip = lambda h: {k: v for k, v in h.items() if k != "epoch"}  # noqa: E731
        metrics = {"best": strip(st.best), "best_on_dev": strip(on_dev), "last": strip(hist[-1]) if hist else {}}
        protocol = {"selection": self.selection_key(), "best_epoch": st.best_epoch,
                    "best_on_dev_epoch": int(on_dev["epoch"]) if on_dev else -1,
                    "epochs_run": len(st.history), "steps": st.step}
        return metrics, protocol

    def _better(self, new: float, old: float) -> bool:
        return new > old if self.task.higher_is_better else new < old

    def _capped(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.step >= self.cfg.max_steps

    def _flush(self, acc: dict[str, Tensor], n: dict[str, int]) -> None:
        """Read accumulated device metrics once (one host sync), check finiteness, log.

        A non-finite loss anywhere in the window makes the cell ``diverged`` (the check runs every
        ``log_every`` steps and at the end of every epoch, so no per-step host sync is needed)."""
        values = {k: float(v) / n[k] for k, v in acc.items()}
        bad = [k for k, v in values.items() if k.startswith("loss/") and not math.isfinite(v)]
        if bad:
            raise Diverged(self.state.step, bad[0])
        values["lr"] = float(self.sched.get_last_lr()[0])
        self.log(self.state.step, values)


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    if lo == 0 and hi >= len(batch):
        return batch
    dom = batch.domain[lo:hi] if batch.domain is not None else None
    return Batch({k: v[lo:hi] for k, v in batch.inputs.items()}, batch.labels[lo:hi],
                 batch.index[lo:hi], dom)
