"""The loop's building blocks: progress lines, seeded generators, autocast, the quiz stream, batch
transforms, optimizers and schedules. :mod:`kdbench.engine.loop` wires them into one cell's training.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from kdbench.contract.errors import ConfigError
from kdbench.contract.rules import QuizStream
from kdbench.contract.spec import CellSpec, TrainConfig, torch_device
from kdbench.contract.tensors import TensorSplit
from kdbench.contract.types import Batch, Task
from kdbench.report import results as machine  # this CPU's facts, as provenance records them

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


def resolve_precision(device: torch.device, precision: str) -> str:
    """``"bf16"`` for ``bf16`` (any device) and ``auto`` on CUDA; ``"fp32"`` for ``fp32`` and ``auto``
    elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    if precision in ("auto", "fp32"):
        return "fp32"
    raise ConfigError(f"precision = {precision!r} is not allowed; use auto, fp32 or bf16")


def cells_training_bf16_on_cpu(cells: Sequence[CellSpec], device: str) -> int:
    """How many of ``cells`` train (or fine-tune their teacher) in bf16 on a CPU; ``device`` is
    the default for cells whose ``train.device`` is ``auto`` on the machine that runs them."""
    n = 0
    for c in cells:
        dev = torch_device(c.train.device if c.train.device != "auto" else device)  # as runner.resolve_device
        n += dev.type == "cpu" and "bf16" in {resolve_precision(dev, t.precision) for t in (c.train, c.teacher_train)}
    return n


class Bf16GemmInFp32(TorchDispatchMode):
    """Matrix products of bf16 CPU tensors as fp32 GEMMs on their (exact) bf16 values, rounded to bf16.

    On a CPU without bf16 kernels (no AVX512-BF16/AMX:
    :func:`~kdbench.report.results.cpu_runs_bf16_natively`), torch runs a bf16 ``mm`` through a
    generic loop: a MiniLM-L6 forward and backward at B=32, T=64 took 34 s there, 28.8 s of it in
    ``aten::mm`` (torch.profiler, one thread, an AVX2 AMD EPYC). The product of
    two bf16 numbers is exact in fp32, so an fp32 GEMM on the up-cast operands accumulates the same
    products in fp32 and rounds once to bf16, as the bf16 kernels do (oneDNN's and torch's fallback
    alike); only the summation order differs, as between two CPU models' kernels. Measured on
    random (2048, 384) x (384, 1536) products: 99.98 % of the outputs equal the fallback's bit for
    bit and the mean error to the float64 product is the same (``tests/test_bf16_cpu.py``), and the
    same step took 2.4 s. Every other op (autocast's choice of which ops run in bf16, SDPA, the
    elementwise ops) is unchanged. A dispatch mode sits below autograd, so the backward's products
    are covered too; it is active for a whole :meth:`~kdbench.engine.loop.Loop.run`
    (:func:`cpu_bf16_kernels`), and the result file records it (``provenance.cpu_bf16_gemm``).
    """

    GEMMS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                       torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default})

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.GEMMS and any(_bf16_cpu(a) for a in args):
            up = [a.float() if _bf16_cpu(a) else a for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def _bf16_cpu(x: object) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def cpu_bf16_kernels(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """:class:`Bf16GemmInFp32` where bf16 autocast runs on a CPU without bf16 kernels; else nothing."""
    if device.type == "cpu" and resolve_precision(device, precision) == "bf16" and not machine.cpu_runs_bf16_natively():
        return Bf16GemmInFp32()
    return contextlib.nullcontext()


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """bf16 autocast where :func:`resolve_precision` says bf16; fp32 (no autocast) otherwise."""
    if resolve_precision(device, precision) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


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
