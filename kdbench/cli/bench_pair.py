"""The benchmark's teacher/student pair, its rows (one per registered method variant) and steps.

Shapes (:data:`SHAPES`): ``minilm``: all-MiniLM-L6-v2 from ``../shared/hf`` + a 2-layer
``pick-layers`` student (from the HF cache or hub when ../shared/hf is absent; no fallback to
another shape); ``bert-base``: a
12-layer 768-wide 12-head BERT built from a ``transformers.BertConfig`` (random init, 30,522-token
embedding) + 6 layers picked from it, SDPA attention, T=128; ``tiny``: the same code path at 4
layers x 64 wide + 2 layers. Rows come from the method registry: every registered method (third
party ones included) is one row, or one row per variant its :attr:`kdbench.Method.bench` declares.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdbench.contract.errors import ConfigError, NotApplicable
from kdbench.contract.registry import suggest

if TYPE_CHECKING:
    from kdbench.contract.rules import DistillLoss, StepCost, TeacherUpdate
    from kdbench.contract.tensors import TaskData
    from kdbench.contract.types import Batch, KDModel, Task
    from kdbench.engine.loop import Loop
    from kdbench.engine.manager import Host

SHARED_HF = Path(__file__).resolve().parents[2].parent / "shared/hf"  # ../shared/hf beside the repo root


@dataclass(frozen=True, slots=True)
class Shape:
    """A benchmark pair (``kdbench/fixtures.toml`` ``[bench.shape.NAME]``): the teacher's model kind
    and options (or a hub checkpoint) and the shape's defaults."""

    model: str
    options: Mapping[str, Any]
    checkpoint: str
    student_layers: int
    seq_len: int
    attn: str


def _fixtures() -> dict[str, Any]:
    bench: dict[str, Any] = tomllib.loads((resources.files("kdbench") / "fixtures.toml").read_text())["bench"]
    return bench


BENCH = _fixtures()
SHAPES: dict[str, Shape] = {
    name: Shape(s["model"], s.get("options", {}), s.get("checkpoint", ""), s["student_layers"], s["seq_len"],
                s["attn"])
    for name, s in BENCH["shape"].items()}
MINILM = SHAPES["minilm"].checkpoint
ATTN = ("eager", "sdpa")
#: options of a :attr:`kdbench.Method.bench` variant
VARIANT_KEYS = ("teacher_update", "loss", "cached_teacher", "epoch", "epochs", "prepare")


@dataclass
class Pair:
    """The shared teacher, student, task, data and batch; ``restore`` resets both models."""

    host: Host
    task: Task
    teacher: KDModel
    student: KDModel
    data: TaskData
    batch: Batch
    device: torch.device
    seq_len: int
    shape: str = ""
    snapshot: list[tuple[torch.nn.Module, dict[str, torch.Tensor], list[bool]]] = field(default_factory=list)

    def restore(self) -> None:
        """Weights, requires_grad flags and grads as built (rules train the teacher)."""
        for model, state, flags in self.snapshot:
            model.load_state_dict(state)
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
                p.grad = None

    def flops(self) -> tuple[float, float]:
        """(F_T, F_S): forward matmul FLOPs per example at ``seq_len``."""
        return self.teacher.flops_per_example(self.seq_len), self.student.flops_per_example(self.seq_len)


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One benchmarked configuration: a registered method and one of its bench variants."""

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One production training step: ``Loop.train_step(batch)``, then ``state.step += 1``."""

    loop: Loop
    batch: Batch
    cost: StepCost | None = None

    def __call__(self) -> dict[str, torch.Tensor]:
        """Run the step (synchronised on CUDA); return the loop's metrics."""
        with self.loop.kernels():
            out = self.loop.train_step(self.batch)
        self.loop.state.step += 1
        if self.loop.device.type == "cuda":
            torch.cuda.synchronize(self.loop.device)
        return out


def minilm_available() -> bool:
    """True when ../shared/hf holds the MiniLM checkpoint."""
    return (SHARED_HF / "hub" / ("models--" + MINILM.replace("/", "--"))).is_dir()


def bench_host() -> Host:
    """The built-ins and installed plugins (what ``kdbench bench`` without ``-p`` sees)."""
    from kdbench.engine.manager import Host, make_plugin_manager

    return Host(make_plugin_manager())


def bench_rows(host: Host, select: tuple[str, ...] | None = None) -> list[BenchRow]:
    """Every registered method's rows in registry order; ``select``: method names or row labels.

    Raises:
        ConfigError: a ``select`` entry matches no row, or a variant has an unknown option.
    """
    rows: list[BenchRow] = []
    for name in host.methods:
        variants = host.methods.get(name).bench or {"": {}}
        for suffix, options in variants.items():
            bad = [k for k in options if k not in VARIANT_KEYS]
            if bad:
                raise ConfigError(f"method {name!r} bench variant {suffix!r}: unknown option {bad[0]!r}; "
                                  f"allowed: {', '.join(VARIANT_KEYS)}.{suggest(bad[0], list(VARIANT_KEYS))}")
            rows.append(BenchRow(f"{name} {suffix}".strip(), name, dict(options)))
    if select:
        names = [*dict.fromkeys([r.method for r in rows] + [r.label for r in rows])]
        missing = [s for s in select if s not in names]
        if missing:
            raise ConfigError(f"bench --methods: unknown {missing[0]!r}; methods and rows: "
                              f"{', '.join(names)}.{suggest(missing[0], names)}")
        rows = [r for r in rows if r.label in select or r.method in select]
    return rows


def build_pair(shape: str = "minilm", student_layers: int = 0, seq_len: int = 0, batch: int = 32,
               device: str = "cpu", attn: str = "", seed: int = 0, host: Host | None = None) -> Pair:
    """Build the :data:`SHAPES` pair and one fixed random batch of ``batch`` x ``seq_len`` tokens.

    0 / "" take the shape's default. ``minilm`` loads from ../shared/hf where that holds the
    checkpoint, else as ``from_pretrained`` does ($HF_HOME, then the hub); a failed load is an error.
    """
    from kdbench.contract.tensors import TaskData, TensorSplit
    from kdbench.engine.training import generator, seed_for, transform

    if shape not in SHAPES:
        raise ConfigError(f"bench --shape {shape!r}: use one of {', '.join(SHAPES)}.{suggest(shape, list(SHAPES))}")
    if attn and attn not in ATTN:
        raise ConfigError(f"bench --attn {attn!r}: use one of {', '.join(ATTN)}")
    spec = SHAPES[shape]
    seq_len, attn = seq_len or spec.seq_len, attn or spec.attn
    host = host or bench_host()
    task_cls = host.tasks.get(BENCH["task"])
    task = task_cls(task_cls.Config())
    model_cls = host.models.get(spec.model)
    if spec.checkpoint:
        local = {"cache_dir": str(SHARED_HF / "hub"), "local_files_only": True} if minilm_available() else {}
        kind = model_cls(model_cls.Config(checkpoint=spec.checkpoint, attn_implementation=attn, **local))
    else:
        kind = model_cls(model_cls.Config(**{"max_position": max(128, seq_len), **spec.options},
                                          attn_implementation=attn))
    skind_cls = host.students.get(BENCH["student"])
    skind = skind_cls(skind_cls.Config(layers=student_layers or spec.student_layers, pick="skip"))
    dev = torch.device(device)
    init = generator(seed_for(seed, "init"))  # the runner's order: teacher, then student
    t_model = kind.build(task.num_labels, init).to(dev)
    s_model = skind.build(kind, task.num_labels, init).to(dev)
    g = generator(seed_for(seed, "bench-batch"))
    vocab = len(t_model.tokenizer)

    def split(name: str) -> TensorSplit:
        ids = torch.randint(5, vocab, (batch, seq_len), generator=g)  # (B, T), no special tokens
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "token_type_ids": torch.zeros_like(ids),
                   "labels": torch.randint(0, task.num_labels, (batch,), generator=g),
                   "index": torch.arange(batch),
                   "domain": torch.randint(0, len(task.domains), (batch,), generator=g)}
        return TensorSplit(name, tensors, ("input_ids", "attention_mask", "token_type_ids")).to(dev)

    splits = {"train": split("train"), "quiz": split("quiz")}
    data = TaskData(task, splits, {"mean_tokens": seq_len, "bench": True}, "bench")
    fixed = transform(task, next(splits["train"].batches(batch)), train=True, gen=None, device=dev)
    snap = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()},
             [p.requires_grad for p in m.parameters()]) for m in (t_model, s_model)]
    return Pair(host, task, t_model, s_model, data, fixed, dev, seq_len, shape, snap)


def components(host: Host, row: BenchRow) -> tuple[type[DistillLoss], Any, TeacherUpdate]:
    """(loss class, loss config, rule instance) from the method's defaults plus the row's overrides."""
    from kdbench.engine.config import build_config

    where, method = f"bench row {row.label!r}", host.methods.get(row.method)
    loss_cls, rule_cls = host.losses.get(method.loss), host.teacher_updates.get(method.teacher_update)
    problems: list[str] = []
    loss_cfg = build_config(loss_cls.Config, [dict(method.defaults.get("loss", {})),
                                              dict(row.options.get("loss", {}))], where, problems)
    rule_cfg = build_config(rule_cls.Config, [dict(method.defaults.get("teacher_update", {})),
                                              dict(row.options.get("teacher_update", {}))], where, problems)
    if problems:
        raise ConfigError(problems)
    return loss_cls, loss_cfg, rule_cls(rule_cfg)


def row_cost(loss_cls: type[DistillLoss], rule: TeacherUpdate, cached: bool) -> StepCost | None:
    """The rule's FLOP model for this loss; "≈" when the loss adds feature terms (``needs``)."""
    cost = rule.cost_model(live_teacher=not cached and loss_cls.uses_teacher)
    return replace(cost, approx=True) if cost is not None and loss_cls.needs else cost


def build_step(pair: Pair, row: BenchRow, lr: float = 5e-5, precision: str = "auto") -> Step:
    """ONE production training step of ``row`` on the pair, as a callable :class:`Step`.

    Restores the pair, builds the method's loss and rule as :func:`components` does, a
    :class:`~kdbench.engine.loop.Loop` around them (``precision``: ``train.precision``), then ``rule.prepare`` and the teacher cache as
    ``Loop.run`` does.

    Raises:
        NotApplicable / ConfigError: the method cannot run on this pair.
    """
    from kdbench.contract.spec import TrainConfig
    from kdbench.engine.evaluation import teacher_cache
    from kdbench.engine.loop import Loop

    pair.restore()
    loss_cls, loss_cfg, rule = components(pair.host, row)
    cached = bool(row.options.get("cached_teacher", False))
    if cached and (rule.changes_teacher or not loss_cls.uses_teacher):
        raise NotApplicable(f"{row.label}: a cached teacher needs a frozen teacher and a loss that uses it")
    cfg = TrainConfig(epochs=10_000, batch_size=len(pair.batch), lr=lr, schedule="constant",
                      log_every=10**9, device=str(pair.device), precision=precision)  # type: ignore[arg-type]
    loss = loss_cls(loss_cfg, task=pair.task, teacher=pair.teacher, student=pair.student).to(pair.device)
    loop = Loop(pair.task, pair.data, pair.student, pair.teacher, loss, rule, cfg, 0, pair.device,
                lambda step, metrics: None, cache_teacher=cached)
    loss.begin_epoch(int(row.options.get("epoch", 0)), int(row.options.get("epochs", 1)))
    with loop.kernels():
        if row.options.get("prepare", True):
            rule.prepare(loop.ctx)
        if cached:
            loop.tcache = teacher_cache(pair.teacher, pair.task, pair.data.splits["train"], loop.ctx.want,
                                        cfg, pair.device, loop.autocast)
    return Step(loop, pair.batch, row_cost(loss_cls, rule, cached))
