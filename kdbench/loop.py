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

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from kdbench.config import TrainConfig
from kdbench.data import TaskData, TensorSplit
from kdbench.diagnostics import TeacherProbe
from kdbench.errors import ConfigError
from kdbench.types import (
    Batch,
    DistillLoss,
    KDModel,
    ModelOutput,
    QuizStream,
    StepContext,
    Task,
    TeacherUpdate,
)

if TYPE_CHECKING:
    from kdbench.teachers import ArtifactStore


#: ``(label, done, total, what)``: where every Loop's progress goes instead of a tqdm bar when set
#: (an executor showing several cells at once, a worker process reporting to its parent)
ProgressSink = Callable[[str, int, int, str], None]
_progress_sink: ProgressSink | None = None


def set_progress_sink(sink: ProgressSink | None) -> ProgressSink | None:
    """Route the progress of every Loop started later in this process to ``sink`` (None: a tqdm
    bar on a terminal); returns the previous sink."""
    global _progress_sink
    previous, _progress_sink = _progress_sink, sink
    return previous


class Progress:
    """One training run's progress line: ``progress(done, total, what)`` with ``what`` naming the
    phase ("step", or a rule's own, e.g. Meta-KD's "meta-teacher"). Goes to the process's sink,
    else to a tqdm bar when stderr is a terminal, else nowhere."""

    def __init__(self, label: str) -> None:
        self.label, self.sink, self.what = label, _progress_sink, ""
        self.bar: tqdm[Any] | None = None

    def __call__(self, done: int, total: int, what: str = "step") -> None:
        if self.sink is not None:
            self.sink(self.label, done, total, what)
            return
        if not sys.stderr.isatty():
            return
        if self.bar is None or what != self.what:
            self.close()
            self.bar = tqdm(total=total, initial=done, desc=f"{self.label} {what}", unit=what,
                            leave=False, file=sys.stderr)
            self.what = what
        else:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Remove the bar (if any)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Diverged(Exception):
    """The loss became NaN/inf; ``step`` is where it was detected."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step = step


def seed_for(seed: int, *names: object) -> int:
    """A 63-bit seed derived from the cell seed and a purpose name (stable across runs)."""
    text = ":".join(str(x) for x in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh seeded generator."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """bf16 autocast for ``bf16`` (any device) and ``auto`` on CUDA; fp32 otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("auto", "fp32"):
        return contextlib.nullcontext
    raise ConfigError(f"precision = {precision!r} is not allowed; use auto, fp32 or bf16")


class SplitQuiz(QuizStream):
    """Endless seeded batches of the quiz split (reshuffled each pass)."""

    def __init__(self, split: TensorSplit, task: Task, batch_size: int, seed: int,
                 device: torch.device) -> None:
        self.split, self.task, self.batch_size, self.device = split, task, batch_size, device
        self.seed, self.passes, self.pos = seed, 0, 0
        self.gen = generator(seed_for(seed, "quiz-aug"), device)
        self._it: Iterator[Batch] | None = None

    def _start(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.split), generator=generator(seed_for(self.seed, "quiz", self.passes)))
        return self.split.batches(min(self.batch_size, len(self.split)), order=order, start=self.pos)

    def next(self) -> Batch:
        """The next quiz batch (transformed like training data)."""
        if self._it is None:
            self._it = self._start()
        batch = next(self._it, None)
        if batch is None:
            self.passes, self.pos = self.passes + 1, 0
            self._it = self._start()
            batch = next(self._it)
        self.pos += 1
        return transform(self.task, batch, train=True, gen=self.gen, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream."""
        return {"passes": self.passes, "pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position."""
        self.passes, self.pos, self._it = int(state["passes"]), int(state["pos"]), None
        self.gen.set_state(state["gen"])


def transform(task: Task, batch: Batch, *, train: bool, gen: torch.Generator | None,
              device: torch.device) -> Batch:
    """Move a batch to ``device`` and apply the task's input transform."""
    batch = batch.to(device)
    inputs = task.transform(dict(batch.inputs), train=train, generator=gen)
    return Batch(inputs, batch.labels, batch.index, batch.domain)


def init_output_bias(model: torch.nn.Module, labels: Tensor) -> float:
    """Set the bias of ``model``'s last one-output linear layer to the mean of ``labels``.

    With zero bias a regression head starts predicting 0 for targets that average, e.g., 2.7
    (STS-B), and Adam moves a bias by about ``lr`` per step, so early training is spent learning
    the offset (leaderboards/README.md measures it on STS-B). Returns the mean.
    """
    heads = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == 1 and m.bias is not None]
    if not heads:
        raise ConfigError(f"train.label_mean_bias: {type(model).__name__} has no one-output linear "
                          "layer with a bias; set label_mean_bias = false")
    mean = float(labels.float().mean())
    with torch.no_grad():
        heads[-1].bias.fill_(mean)
    return mean


def make_optimizer(params: list[torch.nn.Parameter], named: list[tuple[str, torch.nn.Parameter]],
                   cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernels) or SGD; no weight decay on biases and LayerNorm/BatchNorm weights."""
    decay = [p for n, p in named if p.ndim > 1 and "LayerNorm" not in n and "norm" not in n.lower()]
    ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":  # fused kernels: ~5x faster on CPU
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    raise ConfigError(f"optimizer = {cfg.optimizer!r} is not allowed; use adamw or sgd")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                   total: int, stages: tuple[int, ...] = ()) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + linear decay, constant, or multistep (per epoch milestones).

    ``stages`` (epochs at which a loss starts a new stage, see ``DistillLoss.stages``) restart
    warmup + decay: each stage gets its own schedule over its own steps, as if it were a separate
    run. A pure function of the step, so a resumed run continues the same curve."""
    if cfg.schedule not in ("linear", "constant", "multistep"):
        raise ConfigError(f"schedule = {cfg.schedule!r} is not allowed; use linear, constant or multistep")
    starts = sorted({0, *(min(total, e * steps_per_epoch) for e in stages if 0 < e)})
    bounds = [*starts, total]

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "multistep":
            epoch = step // max(1, steps_per_epoch)
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        lo = max(b for b in starts if b <= step) if step < total else starts[-1]
        hi = bounds[bounds.index(lo) + 1]
        n, i = max(1, hi - lo), step - lo
        warm = int(cfg.warmup * n)
        if i < warm:
            return (i + 1) / warm
        return max(0.0, (n - i) / max(1, n - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def split_logits(model: KDModel, task: Task, split: TensorSplit, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any]) -> Tensor:
    """fp32 logits (N, C) of ``model`` (eval mode) for a whole split, in split order, on the CPU."""
    model.eval()
    out = []
    for batch in split.batches(batch_size):
        batch = transform(task, batch, train=False, gen=None, device=device)
        with autocast():
            out.append(model(batch.inputs).logits.float())  # (B, C)
    return torch.cat(out).cpu()


def predict(model: KDModel, task: Task, split: TensorSplit, batch_size: int, device: torch.device,
            autocast: Callable[[], Any]) -> Tensor:
    """Class ids (N,) or regression values (N,) for a whole split, in split order."""
    logits = split_logits(model, task, split, batch_size, device, autocast)
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def evaluate(model: KDModel, task: Task, data: TaskData, cfg: TrainConfig, device: torch.device,
             autocast: Callable[[], Any]) -> dict[str, float]:
    """Metrics on every labelled eval split (and the selection split, e.g. "quiz"), keyed
    ``split/metric``."""
    scores: dict[str, float] = {}
    names = list(task.eval_splits) + ([cfg.select] if cfg.select and cfg.select not in task.eval_splits else [])
    for name in names:
        split = data.splits[name]
        preds = predict(model, task, split, cfg.eval_batch_size, device, autocast)
        for metric, value in task.compute_metrics(preds, split.tensors["labels"], name).items():
            scores[f"{name}/{metric}"] = float(value)
    return scores


@torch.no_grad()
def teacher_cache(teacher: KDModel, task: Task, split: TensorSplit, want: frozenset[str],
                  cfg: TrainConfig, device: torch.device, autocast: Callable[[], Any]) -> dict[str, Tensor]:
    """Teacher logits (and [CLS] vectors if ``want`` has "cls") for every example, by index."""
    teacher.eval()
    logits, cls = [], []
    for batch in split.batches(cfg.eval_batch_size):
        batch = transform(task, batch, train=False, gen=None, device=device)
        with autocast():
            out = teacher(batch.inputs, want=want & {"cls"})
        logits.append(out.logits.float())
        if out.cls is not None:
            cls.append(out.cls.float())
    cache = {"logits": torch.cat(logits)}  # (N, C)
    if cls:
        cache["cls"] = torch.cat(cls)  # (N, L+1, H)
    return cache


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
    stash: dict[str, Any] = field(default_factory=dict)
    artifacts: ArtifactStore | None = None  # StepContext.artifacts
    state: LoopState = field(default_factory=LoopState)
    pending_rule_state: dict[str, Any] | None = None  # restored after rule.prepare() on resume
    keep_best: bool = False  # keep a copy of the student's weights at the best epoch (teachers)
    desc: str = ""  # progress-bar label (a bar is shown when stderr is a terminal)
    best_weights: dict[str, Tensor] | None = None
    probe: TeacherProbe | None = None  # the live teacher against its start (set in __post_init__)

    def __post_init__(self) -> None:
        self.autocast = autocast_factory(self.device, self.cfg.precision)
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
            stash=self.stash, artifacts=self.artifacts)
        self.tcache: dict[str, Tensor] | None = None
        # the starting teacher: captured here, before a resumed cell loads its checkpointed teacher
        if self.teacher is not None:
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
        st, cfg = self.state, self.cfg
        self.ctx.batch, self.ctx.step, self.ctx.epoch = None, st.step, st.epoch  # resume point
        self.stash["resuming"] = self.pending_rule_state is not None
        progress = self.ctx.progress = Progress(self.desc or "train")
        self.log(st.step, {f"prepare/{k}": v for k, v in self.rule.prepare(self.ctx).items()})
        if self.pending_rule_state is not None:
            self.rule.load_state_dict(self.pending_rule_state)
            self.pending_rule_state = None
        if self.cache_teacher and self.teacher is not None:
            self.tcache = teacher_cache(self.teacher, self.task, self.train_split,
                                        self.ctx.want, cfg, self.device, self.autocast)
        acc: dict[str, Tensor] = {}
        nacc = 0
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
                    acc[k] = acc.get(k, 0) + v
                nacc += 1
                if st.step % cfg.log_every == 0 or self._capped():
                    self._flush(acc, nacc)
                    acc, nacc = {}, 0
                if self.checkpoint and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                    st.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.checkpoint(self)
                if self._capped():
                    break
            if acc:
                self._flush(acc, nacc)
                acc, nacc = {}, 0
            st.train_seconds += time.perf_counter() - t0
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
            if self.checkpoint and not self._capped():
                self.checkpoint(self)
        progress.close()
        return st

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

    def _flush(self, acc: dict[str, Tensor], n: int) -> None:
        """Read accumulated device metrics once (one host sync), check finiteness, log.

        A non-finite loss anywhere in the window makes the cell ``diverged`` (the check runs every
        ``log_every`` steps and at the end of every epoch, so no per-step host sync is needed)."""
        values = {k: float(v) / n for k, v in acc.items()}
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


def save_path(root: Path, run_id: str) -> Path:
    """Where a cell's resumable checkpoint lives."""
    return root / "checkpoints" / f"{run_id}.pt"
