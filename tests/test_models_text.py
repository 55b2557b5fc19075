"""Text models: character tokenizer, tiny-bert, the hf kind (local and shared-cache checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdbench.contract.errors import ConfigError
from kdbench_builtins import models_text
from kdbench_builtins.models_text import (
    HFConfig,
    HFModel,
    HFTextModel,
    TinyBert,
    TinyBertConfig,
    char_tokenizer,
)

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ALL = frozenset({"hidden", "cls", "attentions"})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_tiny(path: Path, layers: int = 2, labels: int | None = None) -> Path:
    """A tiny BERT (bare encoder, or with a ``labels`` head) + char tokenizer via save_pretrained."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=labels or 2)
    torch.manual_seed(123)
    model = BertForSequenceClassification(cfg) if labels else BertModel(cfg)
    model.save_pretrained(path)
    char_tokenizer(64).save_pretrained(path)
    return path


def test_char_tokenizer_covers_english() -> None:
    tok = char_tokenizer()
    assert tok.is_fast and len(tok) == 141
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    text = "The café's 3 naïve cats, (Über-)happy!? #1 @home ~50% [ok] {x} <y> a_b; \"quoted\" `tick`"
    enc = tok(text, "second sentence")
    assert tok.unk_token_id not in enc["input_ids"]
    assert enc["input_ids"][0] == 2 and enc["input_ids"][-1] == 3
    assert set(enc["token_type_ids"]) == {0, 1}
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True).startswith("the cafe ' s 3 naive")
    assert char_tokenizer()(text)["input_ids"] == tok(text)["input_ids"]  # deterministic


def test_tiny_bert_outputs() -> None:
    model = TinyBert(TinyBertConfig()).build(3, gen())
    enc = dict(model.tokenizer(["hello there", "a b"], padding=True, return_tensors="pt"))
    out = model(enc, want=ALL)
    assert out.logits.shape == (2, 3)
    assert len(out.hidden) == model.num_layers + 1 == 3
    assert out.cls.shape == (2, 3, 32)
    assert torch.equal(out.cls[:, -1], out.hidden[-1][:, 0])
    assert len(out.attentions) == 2 and out.attentions[0].shape[:2] == (2, 2)
    plain = model(enc)
    assert plain.hidden == () and plain.cls is None and plain.attentions == ()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_tiny_bert_is_seeded_and_regression_aware() -> None:
    a = TinyBert(TinyBertConfig()).build(1, gen(5))
    b = TinyBert(TinyBertConfig()).build(1, gen(5))
    assert a.config.problem_type == "regression" and a.config.num_labels == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_init_output_bias_sets_the_one_output_head() -> None:
    from kdbench.engine.training import init_output_bias

    model = TinyBert(TinyBertConfig()).build(1, gen(5))
    labels = torch.tensor([1.0, 2.0, 4.5, 0.5])
    assert init_output_bias(model, labels) == pytest.approx(2.0)
    assert torch.equal(model.model.classifier.bias, torch.tensor([2.0]))
    with pytest.raises(ConfigError, match="no one-output linear layer"):
        init_output_bias(TinyBert(TinyBertConfig()).build(3, gen(5)), labels)


def test_tiny_bert_vocab_must_cover_tokenizer() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        TinyBert(TinyBertConfig(vocab_size=100)).build(2, gen())


def test_attentions_need_eager() -> None:
    model = TinyBert(TinyBertConfig(attn_implementation="sdpa")).build(2, gen())
    enc = dict(model.tokenizer(["hi"], return_tensors="pt"))
    assert model(enc, want=frozenset({"cls"})).cls.shape == (1, 3, 32)
    with pytest.raises(ConfigError, match='attn_implementation = "eager"'):
        model(enc, want=frozenset({"attentions"}))


def test_flops_match_the_bert_base_figure() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        base = HFTextModel(BertForSequenceClassification(BertConfig()))
    assert base.flops_per_example(128) == pytest.approx(22.35e9, rel=0.005)  # 2·(4d² + 2df) + 4sd per token, × 128


def test_hf_kind_local_bare_encoder_gets_seeded_head(tmp_path: Path) -> None:
    from transformers import BertModel

    path = save_tiny(tmp_path / "enc")
    kind = HFModel(HFConfig(checkpoint=str(path)))
    a, b, c = kind.build(3, gen(1)), kind.build(3, gen(1)), kind.build(3, gen(2))
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    saved = BertModel.from_pretrained(path).state_dict()
    mine = a.model.bert.state_dict()
    assert all(torch.equal(saved[k], mine[k]) for k in saved)
    assert a.origin == str(path) and a.tokenizer.is_fast and a.num_layers == 2
    enc = dict(a.tokenizer(["some words"], return_tensors="pt"))
    assert a(enc).logits.shape == (1, 3)
    assert kind.build(1, gen()).config.problem_type == "regression"


def test_hf_kind_keeps_a_matching_finetuned_head(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    path = save_tiny(tmp_path / "ft", labels=3)
    model = HFModel(HFConfig(checkpoint=str(path))).build(3, gen())
    ref = BertForSequenceClassification.from_pretrained(path)
    assert torch.equal(model.model.classifier.weight, ref.classifier.weight)
    # another label count: fresh head, encoder still loaded
    other = HFModel(HFConfig(checkpoint=str(path))).build(5, gen())
    assert other.model.classifier.weight.shape == (5, 32)


def test_hf_kind_errors_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs checkpoint"):
        HFModel(HFConfig()).build(2, gen())
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError) as err:
        HFModel(HFConfig(checkpoint=missing, local_files_only=True)).build(2, gen())
    msg = str(err.value)
    assert missing in msg and "HF_HOME" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="nobody-org/nothing-here"):
        HFModel(HFConfig(checkpoint="nobody-org/nothing-here", local_files_only=True)).build(2, gen())


def test_registers_text_kinds() -> None:
    got: list[str] = []
    models_text.kdbench_register_models(register=lambda cls: got.append(cls.name))
    assert got == ["tiny-bert", "hf"]


@pytest.mark.skipif(not (SHARED / "hf" / "hub").is_dir(), reason="shared HF cache absent")
def test_minilm_teacher_loads_offline() -> None:
    kind = HFModel(HFConfig(checkpoint=MINILM, cache_dir=str(SHARED / "hf" / "hub"),
                            local_files_only=True))
    model = kind.build(2, gen())
    assert (model.num_layers, model.hidden_size) == (6, 384)
    assert kind.describe() == MINILM
    enc = dict(model.tokenizer(["a great movie"], return_tensors="pt"))
    out = model(enc, want=frozenset({"cls"}))
    assert out.logits.shape == (1, 2) and out.cls.shape == (1, 7, 384)
    # MiniLM-L6-H384: ~22.7M parameters, 6 * (2 * (4 * 384^2 + 2 * 384 * 1536) + 4 * 128 * 384) * 128
    assert 22_000_000 < model.num_parameters() < 23_000_000
    assert model.flops_per_example(128) == 6 * (2 * (4 * 384**2 + 2 * 384 * 1536) + 4 * 128 * 384) * 128


def test_hf_depth_comes_from_config_json_without_weights_or_network(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import kdbench_builtins.models_text as models_text

    path = save_tiny(tmp_path / "three", layers=3)
    (path / "model.safetensors").unlink()  # the depth needs config.json only
    assert HFModel(HFConfig(checkpoint=str(path))).depth() == 3
    assert HFModel(HFConfig(checkpoint="nobody-org/nothing-here")).depth() is None  # not cached: build checks
    assert HFModel(HFConfig()).depth() is None
    asked: list[dict[str, object]] = []
    monkeypatch.setattr(models_text, "_cached_json", lambda name, file, kw: asked.append(dict(kw)))
    HFModel(HFConfig(checkpoint="org/model", local_files_only=False, revision="v1")).depth()
    assert asked == [{"local_files_only": True, "revision": "v1"}]  # planning never downloads
