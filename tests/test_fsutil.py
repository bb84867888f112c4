"""Files and folders appear whole or not at all: a failure while writing leaves the old contents and no partial."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple

import pytest

from lora_cli import fsutil
from lora_cli.errors import RunFailure, UsageError


class Boom(Exception):
    pass


def test_atomic_write_replaces_whole_and_a_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    fsutil.atomic_write(path, "old\n")
    fsutil.atomic_write(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n" and os.listdir(tmp_path) == ["report.json"]

    def disk_full(fd):  # the data went out, but does not all fit on the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", disk_full)
    with pytest.raises(OSError):
        fsutil.atomic_write(path, "newer\n")
    assert path.read_text(encoding="utf-8") == "new\n" and os.listdir(tmp_path) == ["report.json"]


def test_atomic_write_bytes_keeps_the_usual_permissions(tmp_path):
    path = tmp_path / "weights.bin"
    fsutil.atomic_write(path, b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"\x00\x01" and path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_staged_file_keeps_the_suffix_and_is_removed_when_the_block_fails(tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(Boom):
        with fsutil.staged_file(out) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".gguf" and tmp.name.startswith(".model.partial-")
            tmp.write_bytes(b"half")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_replaces_an_existing_folder_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(Boom):
        with fsutil.staged_folder(out, replace=True) as tmp:
            (tmp / "config.json").write_text("half")
            raise Boom
    assert (out / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["merged"]
    with fsutil.staged_folder(out, replace=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and os.listdir(tmp_path) == ["merged"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_staged_folder_without_replace_keeps_what_was_there_first(tmp_path):
    entry = tmp_path / "cache" / "abc"  # parents are created
    with fsutil.staged_folder(entry) as tmp:
        (tmp / "data").write_text("first")
    with pytest.raises(OSError):  # e.g. another process stored the same entry first
        with fsutil.staged_folder(entry) as tmp:
            (tmp / "data").write_text("second")
    assert (entry / "data").read_text() == "first" and os.listdir(entry.parent) == ["abc"]


def test_replace_folder_puts_the_old_one_back_when_the_move_fails(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    (out / "f").write_text("old")
    real_rename = os.rename

    def fail_on_new(src, dst):
        if str(src) == str(new):
            raise OSError(18, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", fail_on_new)
    with pytest.raises(OSError):
        fsutil.replace_folder(new, out)
    assert (out / "f").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_existing_ancestor_and_the_free_space_check(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert fsutil.existing_ancestor(tmp_path / "a" / "b") == tmp_path
    assert fsutil.existing_ancestor(tmp_path / "file") == tmp_path
    usage = namedtuple("usage", "total used free")
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(p) or usage(0, 0, 2**30))
    fsutil.check_free_space(tmp_path / "a" / "b", 0.9 * 2**30, "OUT x: the GGUF")  # 0.945 GiB with the margin
    assert seen == [tmp_path]
    with pytest.raises(RunFailure, match=r"^OUT x: the GGUF needs about 1\.00 GiB, only 1\.00 GiB free on that disk$"):
        fsutil.check_free_space(tmp_path, 2**30, "OUT x: the GGUF")
    with pytest.raises(UsageError, match="lower it$"):
        fsutil.check_free_space(tmp_path, 2**31, "--output_dir x: checkpoints", margin=1.0, error=UsageError,
                                hint="; lower it")
