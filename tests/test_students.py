"""Students: "model" (own kind) and "pick-layers" (exact layers of a pre-trained checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdbench.contract.errors import ConfigError
from kdbench_builtins import students
from kdbench_builtins.models_text import HFConfig, HFModel, TinyBert, TinyBertConfig, char_tokenizer
from kdbench_builtins.models_vision import VISION_KINDS
from kdbench_builtins.students import (
    ModelStudent,
    ModelStudentConfig,
    PickLayers,
    PickLayersConfig,
    pick_indices,
)

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def six_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-trained-style 6-layer BERT encoder (no head) saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert6")
    cfg = BertConfig(vocab_size=160, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(7)
    BertModel(cfg).save_pretrained(path)
    char_tokenizer(64).save_pretrained(path)
    return path


def test_pick_indices() -> None:
    assert pick_indices("first", 6, 12) == [0, 1, 2, 3, 4, 5]
    assert pick_indices("last", 6, 12) == [6, 7, 8, 9, 10, 11]
    assert pick_indices("skip", 6, 12) == [1, 3, 5, 7, 9, 11]
    assert pick_indices("skip", 2, 6) == [2, 5]
    assert pick_indices("skip", 3, 6) == [1, 3, 5]
    assert pick_indices([0, 4], 2, 6) == [0, 4]
    for bad in [("middle", 2, 6), ([0, 6], 2, 6), ([0], 2, 6), ("first", 7, 6), ("first", 0, 6)]:
        with pytest.raises(ConfigError, match=r"student (layers|pick)"):
            pick_indices(*bad)


def check_exact(student: torch.nn.Module, source: dict[str, torch.Tensor], picked: list[int]) -> None:
    """Every student tensor but the head equals the source tensor at the picked layer."""
    mine = student.model.bert.state_dict()
    for key, value in mine.items():
        src = key
        if key.startswith("encoder.layer."):
            j, rest = key[len("encoder.layer."):].split(".", 1)
            src = f"encoder.layer.{picked[int(j)]}.{rest}"
        assert torch.equal(value, source[src]), key
    assert sum(k.startswith("encoder.layer.0.") for k in mine) == sum(
        k.startswith("encoder.layer.0.") for k in source)


def test_pick_layers_skip_holds_exact_checkpoint_weights(six_layer: Path) -> None:
    from transformers import BertModel

    teacher = HFModel(HFConfig(checkpoint=str(six_layer)))
    kind = PickLayers(PickLayersConfig(layers=3, pick="skip"))
    student = kind.build(teacher, 4, gen(1))
    assert student.num_layers == 3 and student.config.num_hidden_layers == 3
    assert len(student.model.bert.encoder.layer) == 3
    check_exact(student, BertModel.from_pretrained(six_layer).state_dict(), [1, 3, 5])
    assert student.origin.endswith("[1,3,5]")
    # head: fresh, seeded by the generator
    again = kind.build(teacher, 4, gen(1))
    other = kind.build(teacher, 4, gen(2))
    assert torch.equal(student.model.classifier.weight, again.model.classifier.weight)
    assert not torch.equal(student.model.classifier.weight, other.model.classifier.weight)
    # shares the teacher's tokenizer and runs
    enc = dict(student.tokenizer(["a short text"], ["pair"], return_tensors="pt"))
    out = student(enc, want=frozenset({"cls", "hidden"}))
    assert out.logits.shape == (1, 4) and out.cls.shape == (1, 4, 32) and len(out.hidden) == 4


def test_pick_layers_explicit_checkpoint_and_list(six_layer: Path) -> None:
    from transformers import BertModel

    teacher = TinyBert(TinyBertConfig())  # the explicit checkpoint overrides the teacher's
    kind = PickLayers(PickLayersConfig(layers=2, pick=(4, 0), checkpoint=str(six_layer)))
    student = kind.build(teacher, 2, gen())
    check_exact(student, BertModel.from_pretrained(six_layer).state_dict(), [4, 0])


def test_pick_layers_from_tiny_bert_teacher_and_eager_double_backward() -> None:
    teacher = TinyBert(TinyBertConfig(layers=4, attn_implementation="sdpa"))
    kind = PickLayers(PickLayersConfig(layers=2, pick="last", attn_implementation="eager"))
    student = kind.build(teacher, 2, gen(3))
    source = teacher.build(2, gen(3)).model.bert.state_dict()  # same generator draw order
    check_exact(student, source, [2, 3])
    assert student.config._attn_implementation == "eager"
    enc = dict(student.tokenizer(["pilot step"], return_tensors="pt"))
    params = dict(student.named_parameters())
    logits = torch.func.functional_call(student, params, (enc,)).logits
    grads = torch.autograd.grad(logits.square().sum(), list(params.values()), create_graph=True,
                                allow_unused=True)
    total = sum(g.square().sum() for g in grads if g is not None)
    second = torch.autograd.grad(total, params["model.classifier.weight"])[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_pick_layers_mean_pooling_reads_masked_mean(six_layer: Path) -> None:
    teacher = HFModel(HFConfig(checkpoint=str(six_layer)))
    mean = PickLayers(PickLayersConfig(layers=2, pooling="mean")).build(teacher, 1, gen(4)).eval()
    cls = PickLayers(PickLayersConfig(layers=2)).build(teacher, 1, gen(4)).eval()
    enc = dict(mean.tokenizer(["a much longer first text", "ab"], ["pair", "c"], return_tensors="pt",
                              padding=True))
    with torch.no_grad():
        out = mean(enc, want=frozenset({"cls", "hidden"}))
        last = out.hidden[-1]  # (B, T, H)
        m = enc["attention_mask"].unsqueeze(-1).float()
        want = mean.model.classifier((last * m).sum(1) / m.sum(1))
        alone = mean(dict(mean.tokenizer(["ab"], ["c"], return_tensors="pt")))
        other = cls(enc)
    assert torch.allclose(out.logits, want, atol=1e-6)
    assert torch.allclose(out.logits[1], alone.logits[0], atol=1e-5)  # padding does not count
    assert out.cls.shape == (2, 3, 32) and len(out.hidden) == 3
    assert not torch.allclose(out.logits, other.logits)  # same weights, other read-out
    mean.train()
    mean(enc).logits.sum().backward()  # the pooler is left out of the graph
    assert mean.model.bert.pooler.dense.weight.grad is None
    assert mean.model.classifier.weight.grad is not None


def test_pooling_errors() -> None:
    from kdbench_builtins.models_text import HFTextModel

    with pytest.raises(ConfigError, match="pooling = 'max' is not allowed; use one of 'auto', 'cls', 'mean'"):
        PickLayers(PickLayersConfig(pooling="max")).modality(TinyBert(TinyBertConfig()))  # plan time
    with pytest.raises(ConfigError, match="needs a BERT-style head"):
        HFTextModel(torch.nn.Linear(2, 2), pooling="mean")


def test_run_ids_name_the_pooling_and_only_regression_ids_the_label_mean_bias() -> None:
    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host, make_plugin_manager
    from kdbench.engine.plan import expand

    host = Host(make_plugin_manager(autoload=False))
    base = {c.run_id: c for c in expand(load_suite("glue-small"), host)}
    explicit = expand(load_suite("glue-small", ["students.minilm-l2.pooling=auto",
                                                "train.label_mean_bias=true"]), host)
    assert {c.run_id for c in explicit} == set(base)  # "auto" and True are the defaults
    pooled = expand(load_suite("glue-small", ["students.minilm-l2.pooling=mean"]), host)
    assert {c.run_id for c in pooled if c.student != "minilm-l2"} <= set(base)
    assert not {c.run_id for c in pooled if c.student == "minilm-l2"} & set(base)
    no_bias = {c.run_id for c in expand(load_suite("glue-small", ["train.label_mean_bias=false"]), host)}
    changed = {base[r].task for r in set(base) - no_bias}
    assert changed == {"glue/stsb"}  # classification resolves label_mean_bias to False at plan time
    assert all(not c.train.label_mean_bias for c in base.values() if c.task != "glue/stsb")


def test_pick_layers_rejects_vision_teacher() -> None:
    teacher = VISION_KINDS["resnet56"](VISION_KINDS["resnet56"].Config())
    with pytest.raises(ConfigError, match="needs a text teacher"):
        PickLayers(PickLayersConfig()).build(teacher, 100, gen())
    with pytest.raises(ConfigError, match="needs a text teacher"):
        PickLayers(PickLayersConfig()).modality(teacher)  # plan time
    assert PickLayers(PickLayersConfig(layers=2)).modality(TinyBert(TinyBertConfig())) == "text"
    with pytest.raises(ConfigError, match="student layers = 6, but the source checkpoint has 2 layers"):
        PickLayers(PickLayersConfig()).modality(TinyBert(TinyBertConfig()))  # plan time, no weights loaded


def test_model_student_builds_own_kind() -> None:
    teacher = VISION_KINDS["resnet56"](VISION_KINDS["resnet56"].Config())
    kind = ModelStudent(ModelStudentConfig(model="resnet20"))
    assert kind.modality(teacher) == "vision"
    student = kind.build(teacher, 100, gen())
    assert student.origin == "resnet20" and student.num_parameters() == 278_324
    wrn = ModelStudent(ModelStudentConfig(model="wrn-16-2", options={"dropout": 0.1}))
    assert wrn.build(teacher, 100, gen()).stages[0][0].dropout == 0.1
    text = ModelStudent(ModelStudentConfig(model="tiny-bert", options={"layers": 1, "hidden": 16}))
    built = text.build(TinyBert(TinyBertConfig()), 2, gen())
    assert (built.num_layers, built.hidden_size) == (1, 16)


def test_model_student_hf_kind(six_layer: Path) -> None:
    kind = ModelStudent(ModelStudentConfig(model="hf", options={"checkpoint": str(six_layer)}))
    student = kind.build(TinyBert(TinyBertConfig()), 2, gen())
    assert student.num_layers == 6 and student.origin == str(six_layer)


@pytest.mark.parametrize(("cfg", "match"), [
    (ModelStudentConfig(model="resnet21"), "not a model kind"),
    (ModelStudentConfig(model="tiny-bert", options={"hiddn": 8}), "'hiddn'"),
    (ModelStudentConfig(model="tiny-bert"), "text model but teacher 'resnet56'"),
])
def test_model_student_errors(cfg: ModelStudentConfig, match: str) -> None:
    teacher = VISION_KINDS["resnet56"](VISION_KINDS["resnet56"].Config())
    with pytest.raises(ConfigError, match=match):
        ModelStudent(cfg).build(teacher, 100, gen())
    with pytest.raises(ConfigError, match=match):
        ModelStudent(cfg).modality(teacher)  # plan time


def test_registers_students() -> None:
    got: list[str] = []
    students.kdbench_register_students(register=lambda cls: got.append(cls.name))
    assert got == ["model", "pick-layers"]


@pytest.mark.skipif(not (SHARED / "hf" / "hub").is_dir(), reason="shared HF cache absent")
def test_minilm_two_layer_student() -> None:
    from transformers import BertModel

    cache = str(SHARED / "hf" / "hub")
    teacher = HFModel(HFConfig(checkpoint=MINILM, cache_dir=cache, local_files_only=True))
    student = PickLayers(PickLayersConfig(layers=2, pick="skip")).build(teacher, 3, gen())
    assert (student.num_layers, student.hidden_size) == (2, 384)
    ref = BertModel.from_pretrained(MINILM, cache_dir=cache, local_files_only=True).state_dict()
    check_exact(student, ref, [2, 5])
    enc = dict(student.tokenizer(["the movie was great"], return_tensors="pt", padding=True))
    out = student(enc, want=frozenset({"cls"}))
    assert out.logits.shape == (1, 3) and out.cls.shape == (1, 3, 384)
    assert torch.isfinite(out.logits).all()
