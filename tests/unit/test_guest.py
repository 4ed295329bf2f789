"""cerulean.testbed.guest: what goes into the guest and how results come back."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

import pytest

from cerulean.errors import CeruleanError
from cerulean.testbed import guest


def test_credential_args_carry_the_value_base64() -> None:
    args = guest.credential_args("systemd.extra-unit.x.service", "[Unit]\nA=b,c\n")
    assert args[0] == "-smbios"
    prefix = "type=11,value=io.systemd.credential.binary:systemd.extra-unit.x.service="
    assert args[1].startswith(prefix)
    encoded = args[1][len(prefix):]
    assert "," not in encoded  # QEMU would split the option there
    assert base64.b64decode(encoded).decode() == "[Unit]\nA=b,c\n"


def test_unit_waits_for_both_disks_and_multi_user() -> None:
    text = guest.UNIT_TEXT
    lines = dict(x.split("=", 1) for x in text.splitlines() if "=" in x and not x[0].isspace())
    # No device units (their jobs give up after 90 s): udevadm waits for both disks.
    assert "Requires" not in lines and ".device" not in text
    assert ("udevadm wait --timeout=900 /dev/disk/by-id/virtio-cerin "
            "/dev/disk/by-id/virtio-cerout") in text
    assert "CERULEAN-GUEST-DONE rc=125" in text
    assert guest._DONE.search(b"CERULEAN-GUEST-DONE rc=125 (the input...)")
    assert "multi-user.target" in lines["After"]
    assert lines["Type"] == "oneshot"
    # $ is doubled for systemd, so the shell sees $(...) and not an expanded variable.
    assert "$$(cut" in text and "$(cut" not in text.replace("$$(cut", "")


def test_input_tar_holds_script_runner_and_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    dest = tmp_path / "in.tar"
    guest._input_tar("echo hi\n", {"data": tmp_path / "d"}, dest)
    assert dest.stat().st_size % 512 == 0
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert names[:2] == ["run.sh", ".cerulean-runner"]
        assert {"data", "data/f"} <= set(names)
        script = tar.extractfile("run.sh")
        assert script is not None and script.read() == b"echo hi\n"
        runner = tar.extractfile(".cerulean-runner")
        assert runner is not None and b"virtio-cerout" in runner.read()


def test_input_tar_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CeruleanError, match="does not exist"):
        guest._input_tar("", {"x": tmp_path / "nope"}, tmp_path / "in.tar")


def _raw_with(members: list[tuple[str, bytes]], path: Path, size: int = 1 << 20) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw + b"\0" * (size - len(raw)))  # the rest of the disk is zeros


def test_output_disk_is_read_back(tmp_path: Path) -> None:
    _raw_with([("./result", b"42\n"), ("./sub/x", b"y")], tmp_path / "out.raw")
    guest._read_output(tmp_path / "out.raw", tmp_path / "res")
    assert (tmp_path / "res/result").read_text() == "42\n"
    assert (tmp_path / "res/sub/x").read_text() == "y"


def test_output_disk_cannot_write_outside(tmp_path: Path) -> None:
    _raw_with([("../escaped", b"no")], tmp_path / "out.raw")
    with pytest.raises(CeruleanError, match="no readable archive"):
        guest._read_output(tmp_path / "out.raw", tmp_path / "res")
    assert not (tmp_path / "escaped").exists()


def test_empty_output_disk_is_an_empty_result(tmp_path: Path) -> None:
    (tmp_path / "out.raw").write_bytes(b"\0" * 65536)
    guest._read_output(tmp_path / "out.raw", tmp_path / "res")
    assert list((tmp_path / "res").iterdir()) == []
