"""The frozen teacher and the frozen-teacher methods: ``kd``, ``pkd-skip``, ``pkd-last``, ``no-kd``.

* ``kd``: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop
  2015 (arXiv:1503.02531). Canonical ``α·T²·KL_batchmean + (1−α)·CE``.
  Defaults T = 5, α = 0.5 (ReptileDistil's README and MetaDistil's NLP defaults), so that ``kd``
  and ``metadistil`` differ only in the teacher-update rule.
* ``pkd-skip`` / ``pkd-last``: Sun, Cheng, Gan, Liu, "Patient Knowledge Distillation for BERT
  Model Compression", EMNLP 2019; checked against intersun/PKD-for-BERT-Model-Compression@9e9e860.
  Defaults: the predefined PKD-skip run (α 0.7, β 500, T 10, normalised [CLS]; ``get_predefine_argv``),
  with the canonical batchmean KD (set ``loss.reduction=elementwise_mean`` for the code's 1/C).
  Deviations: training data is shuffled and the teacher runs online (or from a cache keyed by
  example id) instead of PKD's unshuffled pickle of teacher outputs (``SequentialSampler``).
* ``no-kd``: the student trained on hard labels only (baseline).

No method sets ``train`` defaults (the PKD run used lr 1e-5): every method of a suite trains with
the suite's budget and learning rate, so rows of a leaderboard stay comparable.
"""

from __future__ import annotations

from kdbench import Method, Registrar, StepCost, TeacherUpdate, hookimpl

KD_PAPER = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531 (2015)"
PKD_PAPER = ("Sun, Cheng, Gan, Liu. Patient Knowledge Distillation for BERT Model Compression. "
             "EMNLP 2019 (code: intersun/PKD-for-BERT-Model-Compression)")


class Frozen(TeacherUpdate):
    """``frozen``: the teacher never changes. Exactly the :class:`kdbench.TeacherUpdate` defaults.

    ``changes_teacher = False`` lets the runner cache teacher outputs; ``step`` does nothing.
    """

    name = "frozen"
    version = "1"

    def cost_model(self, *, live_teacher: bool = True) -> StepCost:
        """The loop's step only: teacher forward when live (F_T) + student fwd+bwd (3F_S)."""
        return StepCost(1.0 if live_teacher else 0.0, 3.0)


_PKD_LOSS = {"temperature": 10.0, "alpha": 0.7, "beta": 500.0, "normalize": True}

METHODS = (
    Method(name="kd", teacher_update="frozen", loss="kd",
           defaults={"loss": {"temperature": 5.0, "alpha": 0.5}}, paper=KD_PAPER, version="1",
           description="Hinton KD from a frozen fine-tuned teacher (canonical T²·KL batchmean).",
           bench={"(live teacher)": {}, "(cached teacher)": {"cached_teacher": True}}, role="reference"),
    Method(name="pkd-skip", teacher_update="frozen", loss="pkd",
           defaults={"loss": {**_PKD_LOSS, "layer_map": "skip"}}, paper=PKD_PAPER, version="1",
           description="PKD-Skip: KD + patient [CLS] loss on every other teacher layer.",
           bench={"(live teacher)": {}}),
    Method(name="pkd-last", teacher_update="frozen", loss="pkd",
           defaults={"loss": {**_PKD_LOSS, "layer_map": "last"}}, paper=PKD_PAPER, version="1",
           description="PKD-Last: KD + patient [CLS] loss on the last teacher layers.",
           bench={"(live teacher)": {}}),
    Method(name="no-kd", teacher_update="frozen", loss="ce", defaults={}, paper="", version="1", role="student-only",
           description="The student fine-tuned on hard labels only (no distillation)."),
)


@hookimpl
def kdbench_register_teacher_updates(register: Registrar[type[TeacherUpdate]]) -> None:
    """Register the frozen rule."""
    register(Frozen)


@hookimpl
def kdbench_register_methods(register: Registrar[Method]) -> None:
    """Register the frozen-teacher methods."""
    for method in METHODS:
        register(method)
