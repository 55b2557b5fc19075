"""Safe checkpoint files: round trip, integrity checks, atomic replace, nested states."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdbench.contract.errors import DataError, ExitCode
from kdbench.engine import checkpoints
from kdbench.engine.checkpoints import (
    CorruptCheckpoint,
    load_model_state,
    load_state,
    model_state,
    pack,
    save_state,
    unpack,
)

torch.set_num_threads(1)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, generator=g)
    return {"w": w, "w_tied": w, "half": torch.randn(3, generator=g).bfloat16(),
            "ids": torch.arange(5), "empty": torch.zeros(0, 2), "row": w[2],
            "flag": torch.tensor([True, False])}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.safetensors"
    tensors = sample()
    meta = {"step": 12, "note": "x", "nested": {"a": [1, 2.5, None]}}
    save_state(path, tensors, meta)
    got, got_meta = load_state(path)
    assert got_meta == meta
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert [p.name for p in path.parent.iterdir()] == ["state.safetensors"]  # no temp files left


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, sample(), {"step": 1})
    data = path.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpoint, match=r"s\.safetensors"):
            load_state(path)


def test_flipped_bit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(64)}, {})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the tensor bytes: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        load_state(path)


def test_foreign_and_missing_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(CorruptCheckpoint, match="no kdbench hash"):
        load_state(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpoint):
        load_state(junk)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.safetensors")
    assert issubclass(CorruptCheckpoint, DataError) and CorruptCheckpoint.exit_code == ExitCode.DATA_ERROR


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.zeros(3)}, {"v": 1})

    def boom(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"w": torch.ones(3)}, {"v": 2})
    tensors, meta = load_state(path)
    assert meta == {"v": 1} and torch.equal(tensors["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_replace_is_atomic_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((str(src), str(dst)))
        real(src, dst)
    monkeypatch.setattr(checkpoints.os, "replace", spy)
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(1)}, {})
    assert len(calls) == 1 and Path(calls[0][0]).parent == tmp_path and calls[0][1] == str(path)


def test_model_state_round_trip_with_bn_buffers(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net.train()(torch.randn(2, 3, 8, 8))  # move the running stats
    save_state(tmp_path / "m.safetensors", model_state(net), {})
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    load_model_state(fresh, load_state(tmp_path / "m.safetensors")[0])
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_pack_optimizer_and_rng_states(tmp_path: Path) -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([param], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        param.square().sum().backward()
        opt.step()
    state = {"opt": opt.state_dict(), "py": random.getstate(), "np": np.random.get_state(),
             "torch": torch.get_rng_state(), "param": param.detach().clone()}
    tensors, skeleton = pack(state)
    save_state(tmp_path / "o.safetensors", tensors, {"skeleton": skeleton})
    loaded, meta = load_state(tmp_path / "o.safetensors")
    back = unpack(loaded, meta["skeleton"])
    assert back["py"] == state["py"]
    np.random.set_state(back["np"])
    expect = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(expect, state["np"], strict=True))
    # resumed optimizer takes exactly the same next step
    p2 = torch.nn.Parameter(back["param"].clone())
    opt2 = torch.optim.AdamW([p2], lr=0.1)
    opt2.load_state_dict(back["opt"])
    for p, o in ((param, opt), (p2, opt2)):
        o.zero_grad()
        p.square().sum().backward()
        o.step()
    assert torch.equal(param, p2)
    with pytest.raises(TypeError, match="cannot pack"):
        pack({"x": object()})
