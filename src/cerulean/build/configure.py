"""What maintainer scripts would have done, done deterministically.

One small function per job (accounts, os-release, the CA bundle, trimming,
the dpkg database), each taking the tree and writing plain files. None of them
runs a program from the image, so foreign-architecture images need no
emulation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cerulean.build.definition import Account, ImageDefinition
from cerulean.build.tree import Tree

HOME_URL = "https://github.com/cerulean-linux/cerulean"


# -- accounts ------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


def sysusers_accounts(tree: Tree) -> tuple[list[Account], list[Group]]:
    """Users and groups declared by packages in sysusers.d, with fixed or allocated ids."""
    users: list[tuple[str, str, str, str, str]] = []
    groups: list[tuple[str, str]] = []
    for d in ("usr/lib/sysusers.d", "etc/sysusers.d"):
        for name in tree.listdir(d):
            data = tree.read(f"{d}/{name}")
            if data is None or not name.endswith(".conf"):
                continue
            for line in data.decode(errors="replace").splitlines():
                fields = _split_sysusers(line)
                if len(fields) < 2:
                    continue
                kind, uname = fields[0], fields[1]
                ident = fields[2] if len(fields) > 2 else "-"
                gecos = fields[3] if len(fields) > 3 else "-"
                home = fields[4] if len(fields) > 4 else "-"
                if kind == "u":
                    users.append((uname, ident, gecos, home, fields[5] if len(fields) > 5 else "-"))
                elif kind == "g":
                    groups.append((uname, ident))
    next_id = 999
    taken: set[int] = set()
    out_groups: dict[str, Group] = {}
    out_users: dict[str, Account] = {}

    def alloc() -> int:
        nonlocal next_id
        while next_id in taken:
            next_id -= 1
        taken.add(next_id)
        return next_id

    for name, ident in sorted(groups):
        if ident.isdigit():
            taken.add(int(ident))
            out_groups.setdefault(name, Group(name, int(ident)))
    for _name, ident, _gecos, _home, _shell in sorted(users):
        uid_s = ident.split(":")[0]
        if uid_s.isdigit():
            taken.add(int(uid_s))
    for name, _ident in sorted(groups):
        if name not in out_groups:
            out_groups[name] = Group(name, alloc())
    for uname, ident, gecos, home, shell in sorted(users):
        uid_s, _, gid_s = ident.partition(":")
        uid = int(uid_s) if uid_s.isdigit() else alloc()
        if gid_s.isdigit():
            gid = int(gid_s)
        elif gid_s and gid_s in out_groups:
            gid = out_groups[gid_s].gid
        elif uname in out_groups:
            gid = out_groups[uname].gid
        else:
            gid = uid
        out_groups.setdefault(uname, Group(uname, gid))
        out_users.setdefault(
            uname,
            Account(uname, uid, gid, home if home != "-" else "/nonexistent",
                    shell if shell != "-" else "/usr/sbin/nologin", gecos if gecos != "-" else ""),
        )
    return list(out_users.values()), list(out_groups.values())


def _split_sysusers(line: str) -> list[str]:
    line = line.strip()
    if not line or line.startswith("#"):
        return []
    fields: list[str] = []
    cur = ""
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch.isspace() and not quoted:
            if cur:
                fields.append(cur)
                cur = ""
        else:
            cur += ch
    if cur:
        fields.append(cur)
    return fields


def _master_accounts(tree: Tree) -> tuple[list[Account], list[Group]]:
    """Debian's static system accounts, when base-passwd is part of the image."""
    users: list[Account] = []
    groups: list[Group] = []
    pw = tree.read("usr/share/base-passwd/passwd.master")
    gr = tree.read("usr/share/base-passwd/group.master")
    for line in (pw or b"").decode().splitlines():
        f = line.split(":")
        if len(f) == 7 and f[2].isdigit():
            users.append(Account(f[0], int(f[2]), int(f[3]), f[5], f[6], f[4]))
    for line in (gr or b"").decode().splitlines():
        f = line.split(":")
        if len(f) == 4 and f[2].isdigit():
            groups.append(Group(f[0], int(f[2])))
    return users, groups


def configure_accounts(tree: Tree, accounts: Sequence[Account]) -> None:
    """Write /etc/passwd, /etc/group, /etc/shadow and create home directories."""
    master_users, master_groups = _master_accounts(tree)
    sys_users, sys_groups = sysusers_accounts(tree)
    users: dict[str, Account] = {}
    by_uid: set[int] = set()
    # The definition's accounts come first; others never take a name or uid already used.
    for a in [*accounts, *master_users, *sys_users]:
        if a.name not in users and a.uid not in by_uid:
            users[a.name] = a
            by_uid.add(a.uid)
    groups: dict[str, Group] = {}
    by_gid: set[int] = set()
    for g in [Group(a.name, a.gid) for a in accounts] + master_groups + sys_groups:
        if g.name not in groups and g.gid not in by_gid:
            groups[g.name] = g
            by_gid.add(g.gid)
    ordered = sorted(users.values(), key=lambda a: (a.uid, a.name))
    passwd = "".join(
        f"{a.name}:x:{a.uid}:{a.gid}:{a.gecos}:{a.home}:{a.shell}\n" for a in ordered
    )
    shadow = "".join(f"{a.name}:!:1::::::\n" for a in ordered)
    group = "".join(f"{g.name}:x:{g.gid}:\n" for g in sorted(groups.values(), key=lambda g: g.gid))
    tree.add_file("etc/passwd", passwd.encode(), 0o644)
    tree.add_file("etc/group", group.encode(), 0o644)
    tree.add_file("etc/shadow", shadow.encode(), 0o640, gid=groups["shadow"].gid
                  if "shadow" in groups else 0)
    for a in accounts:
        if a.home.startswith("/") and a.home not in ("/", "/nonexistent"):
            tree.add_dir(a.home.lstrip("/"), 0o700, a.uid, a.gid)
    tree.add_dir("tmp", 0o1777)


# -- os-release ------------------------------------------------------------------


def os_release(defn: ImageDefinition, image_version: str, codename: str) -> bytes:
    fields = {
        "PRETTY_NAME": f"Cerulean Linux {defn.image_version} ({defn.name})",
        "NAME": "Cerulean Linux",
        "ID": "cerulean",
        "ID_LIKE": "debian",
        "VERSION": f"{defn.image_version} ({codename})",
        "VERSION_ID": defn.image_version,
        "VERSION_CODENAME": codename,
        "IMAGE_ID": defn.name,
        "IMAGE_VERSION": image_version,
        "HOME_URL": HOME_URL,
        "SUPPORT_URL": f"{HOME_URL}/issues",
        "BUG_REPORT_URL": f"{HOME_URL}/issues",
    }
    return "".join(f'{k}="{v}"\n' for k, v in fields.items()).encode()


def write_os_release(tree: Tree, defn: ImageDefinition, image_version: str,
                     codename: str) -> None:
    tree.add_file("usr/lib/os-release", os_release(defn, image_version, codename), 0o644)
    e = tree.get("etc/os-release")
    if e is None or e.kind != "symlink":
        tree.remove("etc/os-release")
        tree.add_symlink("etc/os-release", "../usr/lib/os-release")


# -- certificates ----------------------------------------------------------------

CA_DIR = "usr/share/ca-certificates"


def write_ca_bundle(tree: Tree) -> int:
    """Build /etc/ssl/certs/ca-certificates.crt from ca-certificates' files; returns the count."""
    certs = sorted(
        e.path for e in tree.files() if e.path.startswith(CA_DIR + "/") and e.path.endswith(".crt")
    )
    if not certs:
        return 0
    bundle = bytearray()
    conf = ["# Certificates in the bundle, written at image build time.\n"]
    for path in certs:
        data = tree.entries[path].data
        bundle += data if data.endswith(b"\n") else data + b"\n"
        rel = path[len(CA_DIR) + 1 :]
        conf.append(rel + "\n")
        pem = rel.rsplit("/", 1)[-1][: -len(".crt")] + ".pem"
        tree.add_symlink(f"etc/ssl/certs/{pem}", f"/{path}")
    tree.add_file("etc/ssl/certs/ca-certificates.crt", bytes(bundle), 0o644)
    tree.add_file("etc/ca-certificates.conf", "".join(conf).encode(), 0o644)
    return len(certs)


# -- trimming --------------------------------------------------------------------


def trim(tree: Tree, defn: ImageDefinition) -> int:
    """Remove documentation, man pages, locales and listed paths; returns entries removed."""
    removed = 0
    if defn.trim_docs:
        for e in list(tree):
            p = e.path
            if not p.startswith("usr/share/doc/") or p not in tree.entries:
                continue
            rest = p[len("usr/share/doc/") :].split("/")
            keep = len(rest) == 1 or (len(rest) == 2 and rest[1] == "copyright")
            if not keep:
                removed += tree.remove(p)
    for flag, paths in (
        (defn.trim_man, ("usr/share/man", "usr/share/info", "usr/share/groff")),
        (defn.trim_locales, ("usr/share/locale",)),
        (True, tuple(p.lstrip("/") for p in defn.trim_paths)),
    ):
        if flag:
            for p in paths:
                removed += tree.remove(p)
    return removed


# -- dpkg database ---------------------------------------------------------------


@dataclass(frozen=True)
class InstalledPackage:
    name: str
    arch: str
    multi_arch: str
    control: bytes  # the control paragraph from the .deb
    md5sums: bytes
    conffiles: bytes
    files: tuple[str, ...]  # paths the package shipped (relative)
    postinst: bytes = b""


def _status_paragraph(p: InstalledPackage, tree: Tree) -> bytes:
    lines = p.control.decode("utf-8", "surrogateescape").rstrip("\n").split("\n")
    out: list[str] = []
    for line in lines:
        if line.startswith("Package:"):
            out.append(line)
            out.append("Status: install ok installed")
        else:
            out.append(line)
    conffiles = [c.strip() for c in p.conffiles.decode(errors="replace").splitlines() if c.strip()]
    if conffiles:
        out.append("Conffiles:")
        for c in conffiles:
            data = tree.read(c.lstrip("/"))
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest() if data else "newconffile"
            out.append(f" {c} {digest}")
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def _present_md5sums(p: InstalledPackage, tree: Tree) -> bytes:
    """The package's md5sums lines for the files still in the image (after trimming)."""
    kept = []
    for line in p.md5sums.decode("utf-8", "surrogateescape").splitlines():
        _, _, path = line.partition("  ")
        # md5sums may name /bin/x for what merged /usr stores at /usr/bin/x.
        if path and tree.resolve(path) is not None:
            kept.append(line + "\n")
    return "".join(kept).encode("utf-8", "surrogateescape")


def write_dpkg_status_d(tree: Tree, installed: Iterable[InstalledPackage]) -> None:
    """One status file per package (and its md5sums), as image scanners read them."""
    tree.add_dir("var/lib/dpkg/status.d", 0o755)
    for p in installed:
        tree.add_file(f"var/lib/dpkg/status.d/{p.name}", _status_paragraph(p, tree), 0o644)
        md5 = _present_md5sums(p, tree)
        if md5:
            tree.add_file(f"var/lib/dpkg/status.d/{p.name}.md5sums", md5, 0o644)


def write_dpkg_database(tree: Tree, installed: Iterable[InstalledPackage], arch: str) -> None:
    """A complete /var/lib/dpkg, so dpkg and apt inside the image see every package."""
    paragraphs: list[bytes] = []
    for p in sorted(installed, key=lambda p: p.name):
        paragraphs.append(_status_paragraph(p, tree))
        stem = f"{p.name}:{p.arch}" if p.multi_arch == "same" else p.name
        # Trimmed files are not recorded, as dpkg does for path-exclude'd files.
        listing = "/.\n" + "".join(f"/{f}\n" for f in p.files if f in tree.entries)
        tree.add_file(f"var/lib/dpkg/info/{stem}.list", listing.encode(), 0o644)
        md5 = _present_md5sums(p, tree)
        if md5:
            tree.add_file(f"var/lib/dpkg/info/{stem}.md5sums", md5, 0o644)
        if p.conffiles:
            tree.add_file(f"var/lib/dpkg/info/{stem}.conffiles", p.conffiles, 0o644)
    tree.add_file("var/lib/dpkg/status", b"\n".join(paragraphs), 0o644)
    for name in ("available", "diversions", "statoverride"):
        tree.add_file(f"var/lib/dpkg/{name}", b"", 0o644)
    tree.add_file("var/lib/dpkg/arch", f"{arch}\n".encode(), 0o644)
    for d in ("updates", "triggers", "alternatives", "parts"):
        tree.add_dir(f"var/lib/dpkg/{d}", 0o755)


def write_dpkg_excludes(tree: Tree, defn: ImageDefinition) -> None:
    """Tell dpkg inside the image to keep trimming what later installs bring."""
    rules: list[str] = []
    if defn.trim_docs:
        rules += ["path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright"]
    if defn.trim_man:
        rules += ["path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                  "path-exclude=/usr/share/groff/*"]
    if defn.trim_locales:
        rules += ["path-exclude=/usr/share/locale/*"]
    rules += [f"path-exclude={p.rstrip('/')}/*" for p in defn.trim_paths]
    if rules:
        text = "# Written by cerulean: what the image build trimmed stays trimmed.\n"
        tree.add_file("etc/dpkg/dpkg.cfg.d/cerulean-trim", (text + "\n".join(rules) + "\n")
                      .encode(), 0o644)


# -- alternatives ------------------------------------------------------------------

_INSTALL = re.compile(
    r"update-alternatives\s+(?:--quiet\s+)?--install\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)((?:\s+--slave\s+\S+\s+\S+\s+\S+)*)"
)
_SLAVE = re.compile(r"--slave\s+(\S+)\s+(\S+)\s+(\S+)")


@dataclass(frozen=True)
class Alternative:
    name: str
    link: str
    path: str
    priority: int
    package: str
    slaves: tuple[tuple[str, str, str], ...]  # (link, name, path)


def alternatives_from_postinst(package: str, script: bytes) -> list[Alternative]:
    """The literal `update-alternatives --install` calls of a maintainer script."""
    text = script.decode("utf-8", "replace").replace("\\\n", " ")
    found: list[Alternative] = []
    for m in _INSTALL.finditer(text):
        link, name, path, prio, rest = m.groups()
        if any("$" in v for v in (link, name, path)):
            continue  # computed in shell: not knowable without running the script
        slaves = tuple(
            (sl, sn, sp) for sl, sn, sp in _SLAVE.findall(rest or "")
            if "$" not in sl + sn + sp
        )
        found.append(Alternative(name, link, path, int(prio), package, slaves))
    return found


def write_alternatives(tree: Tree, installed: Iterable[InstalledPackage], dpkg_db: bool) -> int:
    """Point each alternative at its highest-priority choice, as dpkg's auto mode would."""
    by_name: dict[str, list[Alternative]] = {}
    for p in installed:
        for alt in alternatives_from_postinst(p.name, p.postinst):
            if tree.resolve(alt.path.lstrip("/")) is not None:
                by_name.setdefault(alt.name, []).append(alt)
    for name, alts in sorted(by_name.items()):
        alts.sort(key=lambda a: (-a.priority, a.path))
        best = alts[0]
        links = [(best.link, name, best.path)] + [
            s for s in best.slaves if tree.resolve(s[2].lstrip("/")) is not None
        ]
        for link, alt_name, path in links:
            rel = link.lstrip("/")
            if tree.get(rel) is None:
                tree.add_symlink(rel, f"/etc/alternatives/{alt_name}")
            tree.add_symlink(f"etc/alternatives/{alt_name}", path)
        if dpkg_db:
            slave_names = sorted({(s[1], s[0]) for a in alts for s in a.slaves})
            lines = ["auto", best.link]
            for sname, slink in slave_names:
                lines += [sname, slink]
            lines.append("")
            for a in alts:
                lines += [a.path, str(a.priority)]
                paths = {s[1]: s[2] for s in a.slaves}
                lines += [paths.get(sname, "") for sname, _ in slave_names]
            lines.append("")
            tree.add_file(f"var/lib/dpkg/alternatives/{name}",
                          ("\n".join(lines) + "\n").encode(), 0o644)
    return len(by_name)
