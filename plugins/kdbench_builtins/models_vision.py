"""CIFAR-100 backbones of the CRD/RepDistiller and MetaDistil model zoos.

Written from the architecture descriptions (He et al. 2016 §4.2; Zagoruyko & Komodakis 2016;
Simonyan & Zisserman 2015 with batch norm, in the CIFAR form used by CRD):

* ``resnet{8,14,20,32,44,56,110}``: 3 stages of ``(depth - 2) / 6`` post-activation basic blocks,
  widths 16/32/64 after a 16-channel stem; a 1x1 conv + BN shortcut where the shape changes.
* ``resnet8x4`` / ``resnet32x4``: the same with a 32-channel stem and widths 64/128/256.
* ``wrn-{16,40}-{1,2}``: pre-activation wide ResNets, ``(depth - 4) / 6`` blocks per stage, widths
  16k/32k/64k, dropout 0 by default.
* ``vgg{8,11,13}``: five conv-BN-ReLU blocks with max-pooling between them, global average pool,
  one linear classifier.

Every network is a :class:`kdbench.contract.types.KDModel` with modality "vision": ``forward(inputs=
{"pixel_values": (B, 3, 32, 32)}, want)`` returns logits (B, C) and, when "hidden" is wanted,
``num_layers + 1`` feature maps: the stem output followed by each stage's output (the text
convention of embeddings + L layers). Modules hold all state (BatchNorm statistics are buffers),
so ``torch.func.functional_call`` with substituted parameters and buffers works.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdbench
from kdbench import KDModel, ModelKind, ModelOutput, NoConfig


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class _BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _WideBlock(nn.Module):
    """Pre-activation wide block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if cin != cout or stride != 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        # a projecting shortcut sees the activated input, an identity one the raw input
        skip = x if self.shortcut is None else self.shortcut(act)
        return self.conv2(out) + skip


class CifarNet(KDModel):
    """Stem + stages + global average pool + linear head; see the module docstring."""

    modality = "vision"

    def __init__(self, stem: nn.Module, stages: list[nn.Module], post: nn.Module,
                 width: int, num_labels: int, origin: str) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.post = post  # applied to the last stage's output (final BN+ReLU for WRN)
        self.fc = nn.Linear(width, num_labels)
        self.width = width
        self.origin = origin
        self._flops: float | None = None

    @property
    def num_layers(self) -> int:
        """Number of stages after the stem."""
        return len(self.stages)

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage."""
        return self.width

    def forward(self, inputs: Mapping[str, Tensor], want: frozenset[str] = frozenset()) -> ModelOutput:  # type: ignore[override]
        """``inputs["pixel_values"]`` (B, 3, 32, 32) -> logits (B, C) [+ hidden feature maps]."""
        x = self.stem(inputs["pixel_values"])
        feats = [x]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.post(x)
            feats.append(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C_last, 1, 1) -> (B, C_last)
        logits = self.fc(pooled)
        return ModelOutput(logits=logits, hidden=tuple(feats) if "hidden" in want else ())

    def flops_per_example(self, seq_len: int = 128) -> float:
        """Conv + linear FLOPs (2 per MAC) of one 32x32 image, counted once with forward hooks.

        ``seq_len`` is ignored (text only).
        """
        if self._flops is None:
            self._flops = 2.0 * count_macs(self, (3, 32, 32))
        return self._flops


def count_macs(model: KDModel, image_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of conv and linear layers for one image of ``image_shape`` (C, H, W)."""
    total = 0

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total += out[0].numel() * k  # per output element: one MAC per kernel weight
        elif isinstance(mod, nn.Linear):
            total += out[0].numel() * mod.in_features
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model({"pixel_values": torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype)})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def _init(model: nn.Module, linear_std: float | None) -> None:
    """Kaiming-normal (fan_out) convs, unit BN, zero biases; global RNG (seeded by the caller)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def resnet(depth: int, widths: tuple[int, int, int, int], num_labels: int, origin: str) -> CifarNet:
    """CIFAR ResNet: stem width ``widths[0]``, stages ``widths[1:]`` with strides 1, 2, 2."""
    n = (depth - 2) // 6
    stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
    stages: list[nn.Module] = []
    cin = widths[0]
    for w, stride in zip(widths[1:], (1, 2, 2), strict=True):
        stages.append(nn.Sequential(*[_BasicBlock(cin if i == 0 else w, w, stride if i == 0 else 1)
                                      for i in range(n)]))
        cin = w
    net = CifarNet(stem, stages, nn.Identity(), widths[-1], num_labels, origin)
    _init(net, linear_std=None)
    return net


def wide_resnet(depth: int, k: int, num_labels: int, origin: str, dropout: float = 0.0) -> CifarNet:
    """WRN-depth-k: 16-channel stem conv, stages 16k/32k/64k, final BN+ReLU."""
    n = (depth - 4) // 6
    widths = (16 * k, 32 * k, 64 * k)
    stages: list[nn.Module] = []
    cin = 16
    for w, stride in zip(widths, (1, 2, 2), strict=True):
        stages.append(nn.Sequential(*[_WideBlock(cin if i == 0 else w, w, stride if i == 0 else 1,
                                                 dropout) for i in range(n)]))
        cin = w
    post = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU())
    net = CifarNet(_conv3x3(3, 16), stages, post, widths[-1], num_labels, origin)
    _init(net, linear_std=None)
    nn.init.zeros_(net.fc.bias)
    return net


_VGG_BLOCKS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def vgg(depth: int, num_labels: int, origin: str) -> CifarNet:
    """CIFAR VGG-BN: block 0 is the stem; blocks 1-4 follow a 2x2 max-pool each (32 -> 2 px)."""
    def block(cin: int, widths: tuple[int, ...], pool: bool) -> nn.Sequential:
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
        for w in widths:
            layers += [_conv3x3(cin, w, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        return nn.Sequential(*layers)

    spec = _VGG_BLOCKS[depth]
    stem = block(3, spec[0], pool=False)
    stages: list[nn.Module] = [block(prev[-1], cur, pool=True) for prev, cur in itertools.pairwise(spec)]
    net = CifarNet(stem, stages, nn.Identity(), spec[-1][-1], num_labels, origin)
    _init(net, linear_std=0.01)
    return net


@dataclass(frozen=True, slots=True)
class WrnConfig:
    """Options of the ``wrn-*`` kinds."""

    dropout: float = kdbench.option(0.0, ge=0, lt=1)  # dropout between the two convs of every block (CRD: 0)


_BUILDERS: dict[str, tuple[Callable[..., CifarNet], dict[str, Any]]] = {
    **{f"resnet{d}": (resnet, {"depth": d, "widths": (16, 16, 32, 64)})
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (resnet, {"depth": 8, "widths": (32, 64, 128, 256)}),
    "resnet32x4": (resnet, {"depth": 32, "widths": (32, 64, 128, 256)}),
    **{f"wrn-{d}-{k}": (wide_resnet, {"depth": d, "k": k}) for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": (vgg, {"depth": d}) for d in (8, 11, 13)},
}


class CifarModelKind(ModelKind):
    """Base of the CIFAR kinds; subclasses set ``name`` (a key of the builder table)."""

    modality = "vision"
    Config = NoConfig

    def build(self, num_labels: int, generator: torch.Generator) -> KDModel:
        """Build with weights drawn from ``generator`` only (the global RNG is left unchanged)."""
        fn, kwargs = _BUILDERS[self.name]
        if isinstance(self.cfg, WrnConfig):
            kwargs = {**kwargs, "dropout": self.cfg.dropout}
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(num_labels=num_labels, origin=self.name, **kwargs)

    def describe(self) -> str:
        """The architecture name, e.g. "resnet56"."""
        return self.name


def _make_kind(name: str) -> type[CifarModelKind]:
    attrs: dict[str, Any] = {"name": name, "__module__": __name__,
                             "__doc__": f"``{name}`` CIFAR backbone (see the module docstring)."}
    if name.startswith("wrn-"):
        attrs["Config"] = WrnConfig
    cls_name = "Kind_" + name.replace("-", "_")
    return type(cls_name, (CifarModelKind,), attrs)


#: name -> ModelKind class, for every CIFAR architecture
VISION_KINDS: dict[str, type[CifarModelKind]] = {n: _make_kind(n) for n in _BUILDERS}


@kdbench.hookimpl
def kdbench_register_models(register: kdbench.Registrar) -> None:
    """Register every CIFAR architecture as a model kind."""
    for cls in VISION_KINDS.values():
        register(cls)
