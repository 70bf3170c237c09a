# Copyright (c) UPSNetRobust authors.
"""Tests of UPSNetCheckpointer's errors: truncated, corrupt and non-checkpoint files are reported
as unreadable (naming the file and the reason), distinct from intact checkpoints that hold
objects other than tensors (refused by weights_only loading unless the user opts in)."""

import argparse
import os
import pickle
import zipfile

import pytest
import torch

from upsnet_robust.modeling.checkpoint import (
    UnreadableCheckpointError,
    UPSNetCheckpointer,
    describe_unreadable_checkpoint,
)

UNREADABLE = "is not a readable PyTorch checkpoint"
UNSAFE = "holds objects other than tensors"


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 32)


def _state_dict():
    return {k: v.clone() for k, v in _model().state_dict().items()}


def _save(path, obj, legacy=False):
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


def _load(path, allow_unsafe=False):
    model = torch.nn.Linear(64, 32)
    torch.nn.init.zeros_(model.weight)
    UPSNetCheckpointer(model, allow_unsafe=allow_unsafe).load(str(path))
    return model


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _unreadable(path, allow_unsafe=False):
    with pytest.raises(UnreadableCheckpointError) as excinfo:
        _load(path, allow_unsafe)
    message = str(excinfo.value)
    assert message.startswith(f"Checkpoint {path} {UNREADABLE}"), message
    assert UNSAFE not in message
    return message


@pytest.mark.parametrize("legacy", [False, True])
def test_intact_checkpoints_load(tmp_path, legacy):
    path = _save(tmp_path / "good.pth", {"model": _state_dict()}, legacy)
    assert torch.equal(_load(path).weight, _model().weight)
    assert describe_unreadable_checkpoint(path) is None


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.5, 0.98, 0.9995])
def test_truncated(tmp_path, legacy, fraction):
    data = open(_save(tmp_path / "full.pth", {"model": _state_dict()}, legacy), "rb").read()
    path = _write(tmp_path / "cut.pth", data[: int(len(data) * fraction)])
    for allow_unsafe in (False, True):
        message = _unreadable(path, allow_unsafe)
        assert "truncated" in message and "corrupt" not in message
        assert f"({int(len(data) * fraction)} bytes)" in message


def test_corrupt_zip_member(tmp_path):
    path = _save(tmp_path / "good.pth", {"model": _state_dict()})
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(open(path, "rb").read())
    # Local header (30 bytes + name), then the member's bytes: damage one in the middle.
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    message = _unreadable(_write(tmp_path / "bad.pth", bytes(data)))
    assert "data.pkl fails its CRC check" in message and "corrupt" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty (0 bytes)"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "git lfs pull"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"hello, this is a text file\n" * 3, "neither a zip archive nor a pickle"),
        (bytes(range(7, 250)), "neither a zip archive nor a pickle"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, expected):
    path = _write(tmp_path / "weights.pth", content)
    for allow_unsafe in (False, True):
        assert expected in _unreadable(path, allow_unsafe)


def test_zip_without_data_pkl(tmp_path):
    path = str(tmp_path / "archive.pth")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "not a checkpoint")
    assert "zip archive without data.pkl" in _unreadable(path)


def test_not_a_state_dict(tmp_path):
    path = _save(tmp_path / "list.pth", [1, 2, 3])
    assert "holds a list" in _unreadable(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_objects_other_than_tensors_message_kept(tmp_path, legacy):
    path = _save(
        tmp_path / "args.pth", {"model": _state_dict(), "args": argparse.Namespace(a=1)}, legacy
    )
    with pytest.raises(ValueError) as excinfo:
        _load(path)
    assert not isinstance(excinfo.value, UnreadableCheckpointError)
    message = str(excinfo.value)
    assert path in message and UNSAFE in message and "MODEL.UNSAFE_LOAD_CHECKPOINT True" in message
    assert torch.equal(_load(path, allow_unsafe=True).weight, _model().weight)


def test_truncated_pkl(tmp_path):
    state = {k: v.numpy() for k, v in _state_dict().items()}
    data = pickle.dumps({"model": state, "__author__": "test"}, protocol=2)
    good = _write(tmp_path / "model.pkl", data)
    assert torch.equal(_load(good, allow_unsafe=True).weight, _model().weight)
    cut = _write(tmp_path / "cut.pkl", data[: len(data) // 2])
    with pytest.raises(ValueError, match="Refusing to unpickle"):
        _load(cut)  # pickles stay refused without the opt-in
    assert "truncated" in _unreadable(cut, allow_unsafe=True)


def test_corrupt_legacy_pickle(tmp_path):
    import io
    import pickletools

    path = _save(tmp_path / "legacy.pth", {"model": _state_dict()}, legacy=True)
    data = bytearray(open(path, "rb").read())
    stream = io.BytesIO(bytes(data))
    for _ in range(3):  # magic number, protocol version, system info
        list(pickletools.genops(stream))
    data[stream.tell() + 2] = 0xFF  # first opcode after PROTO of the object's pickle: unknown
    message = _unreadable(_write(tmp_path / "bad.pth", bytes(data)))
    assert "damaged (corrupt)" in message and "truncated" not in message
