"""Hugging Face text models as kdbench teachers and students.

``hf`` wraps any ``AutoModelForSequenceClassification`` checkpoint (hub name or local path);
``tiny-bert`` builds a small BERT from a config with a character-level WordPiece tokenizer built
in code (tests, offline quickstart). Both return
:class:`kdbench.ModelOutput` with hidden states, [CLS] vectors and attentions on request, without
editing the model code (``output_hidden_states``/``output_attentions``).
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

import kdbench
from kdbench import ConfigError, KDModel, ModelKind, ModelOutput

#: how the classification head reads a sequence: "cls" = the model's own head (BERT: the [CLS]
#: pooler), "mean" = the attention-masked mean of the last layer into the head's dropout + linear,
#: "auto" = what the checkpoint's own pooling configuration says (:func:`resolve_pooling`)
Pooling = Literal["auto", "cls", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)

#: attention implementations an "hf" model may ask transformers for
HFAttention = Literal["eager", "sdpa", "flash_attention_2", "flex_attention"]


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``key = value`` is not one of ``allowed`` (with a did-you-mean), or None."""
    if value in allowed:
        return None
    choices = ", ".join(map(repr, allowed))
    return f"{key} = {value!r} is not allowed; use one of {choices}.{kdbench.suggest(value, list(allowed))}"


def check_pooling(pooling: str) -> None:
    """Raise a ConfigError for a ``pooling`` outside :data:`POOLINGS`."""
    problem = one_of("pooling", pooling, POOLINGS)
    if problem:
        raise ConfigError(problem)


def _cached_json(checkpoint: str, filename: str, kw: Mapping[str, Any]) -> Any:
    """``filename`` of a hub checkpoint (HF cache; downloaded only when online) or a local
    directory, parsed as JSON; None when the checkpoint has no such file."""
    import json

    from transformers.utils import cached_file

    path = cached_file(checkpoint, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **kw)
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def resolve_pooling(pooling: str, checkpoint: str, kw: Mapping[str, Any] | None = None) -> str:
    """"cls" or "mean" for ``pooling``: "auto" reads the checkpoint's sentence-transformers layout.

    A sentence encoder (all-MiniLM-L6-v2) is trained to be read out by the masked mean of its
    last layer, not by BERT's [CLS] pooler (which its training never used): ``modules.json`` names
    a ``Pooling`` module whose ``config.json`` has ``pooling_mode_mean_tokens: true``. "auto" is
    "mean" then and "cls" otherwise (no checkpoint, no such files, or another pooling mode).
    """
    check_pooling(pooling)
    if pooling != "auto":
        return pooling
    if not checkpoint:
        return "cls"
    kw = dict(kw or {})
    modules = _cached_json(checkpoint, "modules.json", kw) or []
    paths = [m.get("path", "") for m in modules
             if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")]
    for path in paths:
        cfg = _cached_json(checkpoint, f"{path}/config.json" if path else "config.json", kw) or {}
        if cfg.get("pooling_mode_mean_tokens") is True:
            return "mean"
    return "cls"


class HFTextModel(KDModel):
    """A ``*ForSequenceClassification`` model behind kdbench's output interface."""

    modality = "text"

    def __init__(self, model: Any, tokenizer: Any = None, origin: str = "", pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f'HFTextModel pooling = {pooling!r}: resolve "auto" first (resolve_pooling)')
        if pooling == "mean" and not (isinstance(getattr(model, "classifier", None), torch.nn.Linear)
                                      and isinstance(getattr(model, "dropout", None), torch.nn.Dropout)):
            raise ConfigError(f'pooling = "mean" needs a BERT-style head (dropout, then one linear '
                              f'classifier); {type(model).__name__} has another; use pooling = "cls"')
        self.model = model
        self._tokenizer = tokenizer
        self.origin = origin
        self.pooling = pooling  # resolved read-out, recorded in results
        #: for students copied from a deeper checkpoint: the source layer of each layer (0-based)
        self.picked_layers: tuple[int, ...] | None = None

    @property
    def tokenizer(self) -> Any:
        """The fast tokenizer (None for models built from a config without one)."""
        return self._tokenizer

    @property
    def config(self) -> Any:
        """The HF config."""
        return self.model.config

    @property
    def num_layers(self) -> int:
        """Transformer layers."""
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """Hidden width."""
        return int(self.model.config.hidden_size)

    def forward(self, inputs: Mapping[str, Tensor], want: frozenset[str] = frozenset()) -> ModelOutput:  # type: ignore[override]
        """Logits (B, C); hidden states / [CLS] / attentions when ``want`` asks for them."""
        hidden = bool(want & {"hidden", "cls"})
        attn = "attentions" in want
        if attn and getattr(self.model.config, "_attn_implementation", "eager") != "eager":
            raise ConfigError(
                f"model {self.origin!r} was built with attn_implementation="
                f"{self.model.config._attn_implementation!r}, which returns no attention "
                'probabilities; set attn_implementation = "eager" for losses that need attentions')
        kw = {"output_hidden_states": hidden, "output_attentions": attn, "return_dict": True}
        if self.pooling == "mean":  # the base model, then the head on the masked mean (the pooler goes unused)
            out = getattr(self.model, self.model.base_model_prefix)(**inputs, **kw)
            last = out.last_hidden_state  # (B, T, H)
            mask = inputs.get("attention_mask")
            w = (torch.ones(last.shape[:2], device=last.device) if mask is None else mask).to(last.dtype)
            pooled = (last * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, H)
            logits = self.model.classifier(self.model.dropout(pooled))
        else:
            out = self.model(**inputs, **kw)
            logits = out.logits
        hs: tuple[Tensor, ...] = tuple(out.hidden_states) if hidden else ()
        cls = torch.stack([h[:, 0] for h in hs], dim=1) if "cls" in want else None  # (B, L+1, H)
        att: tuple[Tensor, ...] = tuple(out.attentions) if attn else ()
        return ModelOutput(logits=logits, hidden=hs if "hidden" in want else (),
                           attentions=att, cls=cls)

    def flops_per_example(self, seq_len: int = 128) -> float:
        """Forward matmul FLOPs per sequence: dense layers + attention scores, 2 per multiply-add."""
        c = self.model.config
        d, layers = int(c.hidden_size), int(c.num_hidden_layers)
        f = int(getattr(c, "intermediate_size", None) or getattr(c, "hidden_dim", None) or 4 * d)
        per_token = layers * (2 * (4 * d * d + 2 * d * f) + 4 * seq_len * d)
        return float(per_token * seq_len)


_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4; [PAD] = 0 as BertConfig expects
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


#: the character tokenizer's vocabulary size (:func:`char_tokenizer`)
CHAR_VOCAB = len(_SPECIAL) + 2 * len(_CHARS)


def char_tokenizer(max_length: int = 128) -> Any:
    """A deterministic BERT-style fast tokenizer over single characters (141 tokens).

    Vocabulary: the five special tokens, lowercase letters, digits, ASCII punctuation and their
    "##" continuations. Text is lower-cased and accent-stripped, so any English text tokenizes
    (one token per character); other scripts map to [UNK]. Pairs get token_type_ids 0/1.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [*_SPECIAL, *_CHARS, *("##" + ch for ch in _CHARS)]
    vocab = {tok: i for i, tok in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@contextlib.contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Seed the global torch RNG from ``generator`` inside the block, restoring it afterwards.

    HF initialises fresh weights (heads, missing keys) from the global RNG; this makes that init
    a function of ``generator`` only, without disturbing anyone else's random stream.
    """
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True, slots=True)
class TinyBertConfig:
    """A BERT built from a config (random weights): for tests and the offline quickstart."""

    layers: int = kdbench.option(2, ge=1)  # transformer layers
    hidden: int = kdbench.option(32, ge=1)  # hidden width
    heads: int = kdbench.option(2, ge=1)  # attention heads
    intermediate: int = kdbench.option(64, ge=1)  # FFN width
    vocab_size: int = 1000  # embedding rows; must cover the 141-token character tokenizer
    max_position: int = kdbench.option(128, ge=1)  # position embeddings (= tokenizer model_max_length)
    attn_implementation: Literal["eager", "sdpa"] = "eager"

    def validate(self) -> list[str]:
        """What BertConfig and the character tokenizer need, checked at plan time."""
        problems = []
        if self.heads > 0 and self.hidden % self.heads:  # heads >= 1 is a declared bound
            problems.append(f"hidden = {self.hidden} must be a multiple of heads = {self.heads}")
        if self.vocab_size < CHAR_VOCAB:
            problems.append(f"vocab_size = {self.vocab_size} is smaller than the character tokenizer "
                            f"({CHAR_VOCAB} tokens); set vocab_size >= {CHAR_VOCAB}")
        return problems


class TinyBert(ModelKind):
    """``tiny-bert``: ``BertForSequenceClassification`` from ``BertConfig`` (no download)."""

    name = "tiny-bert"
    modality = "text"
    Config = TinyBertConfig

    def build(self, num_labels: int, generator: torch.Generator) -> KDModel:
        """Seeded random init from the config, with the character tokenizer."""
        from transformers import BertConfig, BertForSequenceClassification

        c: TinyBertConfig = self.cfg
        problems = c.validate()  # checked at plan time; this is for configs built in code
        if problems:
            raise ConfigError(f"tiny-bert: {'; '.join(problems)}")
        tokenizer = char_tokenizer(c.max_position)
        config = BertConfig(  # type: ignore[call-arg]  # HF config kwargs are untyped
            vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers,
            num_attention_heads=c.heads, intermediate_size=c.intermediate,
            max_position_embeddings=c.max_position, num_labels=num_labels,
            problem_type="regression" if num_labels == 1 else "single_label_classification",
            attn_implementation=c.attn_implementation,
        )
        with seeded(generator):
            model = BertForSequenceClassification(config)
        return HFTextModel(model, tokenizer=tokenizer, origin=f"tiny-bert({c.layers}x{c.hidden})")

    def describe(self) -> str:
        """Origin string."""
        return f"tiny-bert {self.cfg.layers}L-{self.cfg.hidden}H"


@dataclass(frozen=True, slots=True)
class HFConfig:
    """Options of the ``hf`` kind."""

    checkpoint: str = ""  # hub name ("bert-base-uncased") or local directory
    attn_implementation: HFAttention = "sdpa"  # "eager" for attention losses or double backward
    revision: str = ""  # hub branch/tag/commit; "" = the default branch
    cache_dir: str = ""  # HF cache directory; "" = $HF_HOME / the HF default
    local_files_only: bool = False  # never touch the network (HF_HUB_OFFLINE=1 does the same)
    pooling: Pooling = "auto"  # "auto": the checkpoint's own (mean for sentence encoders) | "cls" | "mean"

    def validate(self) -> list[str]:
        """A checkpoint is named (plan time; the choices are typed)."""
        return [] if self.checkpoint else ['needs checkpoint = "<hub name or local path>"']


class HFModel(ModelKind):
    """``hf``: any ``AutoModelForSequenceClassification`` checkpoint plus its fast tokenizer.

    A checkpoint without a matching classifier head (a bare encoder, or a head with another
    number of labels) gets a fresh head drawn from the build generator.
    """

    name = "hf"
    modality = "text"
    Config = HFConfig

    def resolved_pooling(self, pooling: str = "") -> str:
        """What ``pooling`` (default: this kind's option) resolves to for this checkpoint."""
        return resolve_pooling(pooling or self.cfg.pooling, self.cfg.checkpoint, self._kwargs())

    def depth(self) -> int | None:
        """The checkpoint's transformer layers from its ``config.json`` in the HF cache or a local
        folder, without loading weights or touching the network (planning stays offline and
        fast); None when it is not there yet (then the build checks it)."""
        if not self.cfg.checkpoint:
            return None
        offline = {**self._kwargs(), "local_files_only": True}
        cfg = _cached_json(self.cfg.checkpoint, "config.json", offline)
        return next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers")
                     if isinstance(cfg, dict) and isinstance(cfg.get(k), int)), None)

    def _kwargs(self) -> dict[str, Any]:
        c: HFConfig = self.cfg
        kw: dict[str, Any] = {"local_files_only": c.local_files_only}
        if c.revision:
            kw["revision"] = c.revision
        if c.cache_dir:
            kw["cache_dir"] = c.cache_dir
        return kw

    def _fail(self, what: str, exc: Exception) -> ConfigError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ConfigError(
            f"hf checkpoint {self.cfg.checkpoint!r}: cannot load its {what} ({first}). Hint: "
            "check the name, set HF_HOME to a cache that holds it (offline: HF_HUB_OFFLINE=1), "
            "or give a local directory written by save_pretrained")

    def load_tokenizer(self) -> Any:
        """The checkpoint's fast tokenizer."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.cfg.checkpoint, **self._kwargs())
        except (OSError, ValueError) as exc:
            raise self._fail("tokenizer", exc) from None
        if not getattr(tok, "is_fast", False):
            raise ConfigError(f"hf checkpoint {self.cfg.checkpoint!r} has no fast tokenizer "
                              "(tokenizer.json); kdbench needs one for offset-free batching")
        return tok

    def build(self, num_labels: int, generator: torch.Generator) -> KDModel:
        """``from_pretrained`` with ``num_labels``; fresh weights are seeded by ``generator``."""
        from transformers import AutoModelForSequenceClassification

        c: HFConfig = self.cfg
        problems = c.validate()  # checked at plan time; this is for configs built in code
        if problems:
            raise ConfigError(f"hf: {'; '.join(problems)}")
        tokenizer = self.load_tokenizer()
        problem = "regression" if num_labels == 1 else "single_label_classification"
        try:
            with seeded(generator):
                model = AutoModelForSequenceClassification.from_pretrained(
                    c.checkpoint, num_labels=num_labels, problem_type=problem,
                    attn_implementation=c.attn_implementation, ignore_mismatched_sizes=True,
                    **self._kwargs())
        except (OSError, ValueError) as exc:
            raise self._fail("weights", exc) from None
        return HFTextModel(model, tokenizer=tokenizer, origin=c.checkpoint, pooling=self.resolved_pooling())

    def describe(self) -> str:
        """The checkpoint name (with revision)."""
        rev = f"@{self.cfg.revision}" if self.cfg.revision else ""
        return f"{self.cfg.checkpoint}{rev}"


@kdbench.hookimpl
def kdbench_register_models(register: kdbench.Registrar) -> None:
    """Text model kinds."""
    register(TinyBert)
    register(HFModel)
