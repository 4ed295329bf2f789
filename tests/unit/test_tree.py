"""The rootfs tree refuses every way a package could write outside the image."""

from __future__ import annotations

import io
import tarfile

import pytest

from cerulean.build.tree import Tree, UnsafePathError, normalize
from cerulean.build.unpack import Unpacked, unpack_into
from cerulean.debian.lock import LockedPackage


def data_tar(*members: tuple[str, str, str | bytes]) -> bytes:
    """A data archive from (kind, name, payload) with kind file/dir/sym/hard/dev."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for kind, name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "dir" else 0o644
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(payload)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(payload)
            elif kind == "dev":
                ti.type = tarfile.CHRTYPE
            tf.addfile(ti)
    return buf.getvalue()


PKG = LockedPackage("evil", "1.0", "amd64", "evil", "1.0", "0" * 64, 1, "trixie", "pool/e.deb")


def unpack(tree: Tree, tar: bytes) -> list[str]:
    return unpack_into(tree, Unpacked(PKG, {"control": b"Package: evil\n"}, tar))


def test_normal_package_lands_under_usr() -> None:
    t = Tree()
    shipped = unpack(t, data_tar(("dir", "./", ""), ("dir", "./bin", ""),
                                 ("file", "./bin/tool", "x"), ("sym", "./bin/t", "tool")))
    assert t.get("usr/bin/tool") is not None and t.get("usr/bin/tool").package == "evil"
    assert "bin/tool" not in t.entries  # merged /usr: stored under usr/
    assert shipped == ["usr/bin", "usr/bin/tool", "usr/bin/t"]
    t.add_merged_usr_links()
    assert t.read("bin/t") == b"x"


@pytest.mark.parametrize(
    "members, words",
    [
        ([("file", "../../etc/evil", "x")], "climbs out"),
        ([("file", "./usr/../../etc/evil", "x")], "climbs out"),
        ([("file", "/etc/passwd", "x")], "absolute path"),
        ([("sym", "./usr/share/evil", "/etc"), ("file", "./usr/share/evil/cron", "x")],
         "symlink '/usr/share/evil' planted earlier"),
        ([("sym", "./usr/share/up", "../../../../.."), ("file", "./usr/share/up/tmp/x", "x")],
         "planted earlier"),
        ([("sym", "./usr/share/a", "b"), ("dir", "./usr/share/a/sub", "")], "planted earlier"),
        ([("hard", "./usr/bin/h", "../../etc/shadow")], "climbs out"),
        ([("hard", "./usr/bin/h", "./usr/bin/missing")], "not a file"),
        ([("dev", "./dev/sda", "")], "device or FIFO"),
        ([("sym", "./bin", "/etc")], "must point to usr/bin"),
        ([("file", "./usr/lib/x/f", "x"), ("sym", "./usr/lib/x", "/")], "non-empty directory"),
        ([("file", "./usr/f", "x"), ("file", "./usr/f/g", "x")], "goes through the file"),
    ],
)
def test_hostile_entries_are_refused(members: list[tuple[str, str, str]], words: str) -> None:
    t = Tree()
    with pytest.raises(UnsafePathError) as exc:
        unpack(t, data_tar(*members))
    msg = str(exc.value)
    assert "evil 1.0 (amd64) is refused" in msg
    assert words in msg


def test_symlink_resolution_stays_inside_root() -> None:
    t = Tree()
    t.add_file("etc/secret", b"inside")
    t.add_symlink("usr/share/up", "../../../../../etc/secret")
    t.add_symlink("usr/share/abs", "/etc/secret")
    t.add_symlink("usr/share/loop", "loop")
    assert t.read("usr/share/up") == b"inside"
    assert t.read("usr/share/abs") == b"inside"
    assert t.resolve("usr/share/loop") is None


def test_normalize() -> None:
    assert normalize("./a//b/./c") == "a/b/c"
    assert normalize("./") == ""
    with pytest.raises(UnsafePathError):
        normalize("a/\x00b")


def test_remove_and_listdir() -> None:
    t = Tree()
    t.add_file("usr/share/doc/p/copyright", b"c")
    t.add_file("usr/share/doc/p/changelog.gz", b"c")
    assert t.listdir("usr/share/doc/p") == ["changelog.gz", "copyright"]
    assert t.remove("usr/share/doc/p/changelog.gz") == 1
    assert t.remove("usr/share/doc") == 3
    assert t.listdir("usr/share") == []
