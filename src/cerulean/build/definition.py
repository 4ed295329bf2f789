"""Image definitions: ``images/NAME.toml`` parsed and validated into a frozen object.

One table, :data:`SETTINGS`, names every key: its section, type, default and
help text. Parsing, validation, error messages and the reference in
``docs/image-definitions.md`` all come from it, so they cannot drift apart.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cerulean.debian.archive import DEFAULT_COMPONENTS, DEFAULT_SUITES
from cerulean.errors import CeruleanError

ARCHES = ("amd64", "arm64")
COMPRESSIONS = ("gzip", "zstd")
KINDS = ("container", "system")
DISK_FORMATS = ("raw", "qcow2", "vhd", "vhdx")
DPKG_DBS = ("status.d", "full")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.{}-]+$")


# A checkout's images/ (also when installed from it in development mode), else where the
# cerulean package puts them (build/cerulean_deb.py).
BUILTIN_IMAGES = next((d for d in (Path(__file__).resolve().parents[3] / "images",
                                   Path("/usr/share/cerulean/images")) if d.is_dir()),
                      Path(__file__).resolve().parents[3] / "images")


def images_dir() -> Path:
    """./images when run from a checkout's top directory, else the built-in definitions."""
    local = Path("images")
    return local if local.is_dir() else BUILTIN_IMAGES


class DefinitionError(CeruleanError):
    """An image definition is invalid."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str = "/sbin/nologin"
    gecos: str = ""


DEFAULT_ACCOUNTS = (
    Account("root", 0, 0, "/root", "/sbin/nologin", "root"),
    Account("nonroot", 65532, 65532, "/home/nonroot", "/sbin/nologin", "nonroot"),
    Account("nobody", 65534, 65534, "/nonexistent", "/sbin/nologin", "nobody"),
)


# What the cerulean-agent package (on every system image) depends on; system image
# locks always include it.
AGENT_DEPENDS = ("python3", "python3-tuf", "python3-cryptography", "python3-yaml", "zstd", "fdisk")
# What the package itself requires everywhere; the rest of AGENT_DEPENDS is for updates
# (Cerulean disks only), so the package recommends it: Debian 12 has no python3-tuf.
AGENT_REQUIRES = ("python3 (>= 3.11)", "python3-yaml")


def _window_ok(value: Any) -> str | None:
    from cerulean.protocol.window import WindowError, parse_window

    try:
        parse_window(value)
    except WindowError as e:
        return str(e).rstrip(".")
    return None


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: str  # str, bool, int, list[str], table[str], accounts
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns an error text or None

    @property
    def attr(self) -> str:
        return f"{self.section}_{self.key}".replace("-", "_")


def _names_ok(pattern: re.Pattern[str], what: str) -> Callable[[Any], str | None]:
    def check(values: Any) -> str | None:
        bad = [v for v in values if not pattern.match(v)]
        return f"{bad[0]!r} is not a valid {what}" if bad else None

    return check


def _abs_path(value: Any) -> str | None:
    return None if str(value).startswith("/") else f"{value!r} is not an absolute path"


SETTINGS: tuple[Setting, ...] = (
    Setting("image", "name", "str", None, "Image name; defaults to the file name.",
            check=lambda v: None if NAME_RE.match(v) else f"{v!r} is not a valid image name"),
    Setting("image", "description", "str", "", "One line shown by `cerulean images`."),
    Setting("image", "kind", "str", "container",
            "'container': an OCI image composed without maintainer scripts; 'system': a "
            "bootable disk image (Essential packages included, dpkg run for real).",
            choices=KINDS),
    Setting("image", "version", "str", "13", "VERSION_ID in /etc/os-release."),
    Setting("image", "architectures", "list[str]", list(ARCHES),
            "Debian architectures to lock and build.", choices=ARCHES),
    Setting("packages", "include", "list[str]", [],
            "Packages to install, with their dependencies ('name', 'name=version').",
            check=lambda v: None if v else "at least one package is needed"),
    Setting("packages", "exclude", "list[str]", [],
            "Packages never installed: dependencies on them count as met "
            "(for example dpkg or debconf, needed only by maintainer scripts).",
            check=_names_ok(PKG_RE, "package name")),
    Setting("packages", "cerulean", "bool", False,
            "Add Cerulean itself (the cerulean command: build, release, publisher) and the "
            "python-sat solver it needs, repacked from a pinned wheel; their Debian "
            "dependencies join the lock. Container images only."),
    Setting("archive", "mirror", "str", "",
            "Debian archive URL; default: the host's apt sources or CERULEAN_MIRROR."),
    Setting("archive", "security-mirror", "str", "",
            "Debian security archive URL; default: next to the mirror."),
    Setting("archive", "keyring", "str", "",
            "OpenPGP keyring (binary, as gpgv reads it) that must have signed the suites' "
            "InRelease files, relative to the definition; default: the Debian archive keys "
            "shipped with Cerulean."),
    Setting("archive", "suites", "list[str]", list(DEFAULT_SUITES),
            "Suites to resolve from; the highest version across them wins."),
    Setting("archive", "components", "list[str]", list(DEFAULT_COMPONENTS),
            "Archive components."),
    Setting("accounts", "users", "accounts", None,
            "Users as tables {name, uid, gid, home, shell}; default: root 0, "
            "nonroot 65532, nobody 65534. Each user gets a group of the same name and id."),
    Setting("config", "user", "str", "", "User the container runs as (name or uid)."),
    Setting("config", "workdir", "str", "/", "Working directory.", check=_abs_path),
    Setting("config", "entrypoint", "list[str]", [], "Entrypoint command."),
    Setting("config", "cmd", "list[str]", [], "Default arguments."),
    Setting("config", "env", "table[str]", {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    }, "Environment variables."),
    Setting("config", "labels", "table[str]", {}, "Extra image labels and annotations."),
    Setting("trim", "docs", "bool", True,
            "Remove /usr/share/doc, except each package's copyright file."),
    Setting("trim", "man", "bool", True, "Remove man and info pages."),
    Setting("trim", "locales", "bool", True, "Remove translations (/usr/share/locale)."),
    Setting("trim", "paths", "list[str]", ["/usr/share/lintian", "/usr/share/bug"],
            "Further paths to remove.", check=lambda v: next(
                (f"{p!r} is not an absolute path" for p in v if not p.startswith("/")), None)),
    Setting("output", "compression", "str", "gzip", "Layer compression.", choices=COMPRESSIONS),
    Setting("system", "hostname", "str", "cerulean", "Default host name of a system image."),
    Setting("system", "format", "str", "qcow2", "Default disk image format (--format).",
            choices=DISK_FORMATS),
    Setting("system", "kernel-cmdline", "list[str]", [],
            "Extra kernel command line arguments, in every slot's UKI."),
    Setting("system", "usr-slot-mib", "int", 0,
            "Size of each /usr slot in MiB; 0 picks the content size plus room to grow."),
    Setting("system", "enable", "list[str]", [], "systemd units to enable."),
    Setting("system", "disable", "list[str]", [], "systemd units to disable."),
    Setting("system", "setuid-allow", "list[str]", [],
            "Programs that may keep a setuid/setgid bit; every other one loses it."),
    Setting("system", "initrd-modules", "list[str]", [], "Extra dracut modules."),
    Setting("system", "initrd-drivers", "list[str]", [],
            "The kernel modules the initrd carries (with what they need): the drivers of "
            "the disks the image boots from. Empty: every storage driver of the kernel, for "
            "hardware nobody can list in advance.",
            check=_names_ok(re.compile(r"^[A-Za-z0-9_-]+$"), "kernel module name")),
    Setting("system", "boot-tries", "int", 3,
            "Boots a new slot gets to reach boot-complete.target before systemd-boot falls "
            "back to the other slot (boot counting); 0 turns counting off.",
            check=lambda v: "must be at most 9" if v > 9 else None),
    Setting("system", "read-only", "bool", False,
            "Mount the root file system read-only; /var gets its own writable partition, "
            "which grows to the disk on first boot."),
    Setting("system", "agent", "bool", True,
            "Install the cerulean-agent package (updates, health check); its dependencies "
            "join the lock."),
    Setting("update", "url", "str", "",
            "Base URL of the TUF update repository the hosts poll (system images). Empty: "
            "no automatic updates until /etc/cerulean/update.toml names one."),
    Setting("update", "root", "str", "",
            "The repository's root.json the image trusts (path relative to the definition); "
            "needed with update.url."),
    Setting("update", "channel", "str", "stable", "Release channel the hosts follow.",
            choices=("stable", "lts", "preview")),
    Setting("update", "window", "str", "",
            "Maintenance window for reboots into an update, e.g. 'Sat 02:00-04:00' or "
            "'daily 01:00-05:00' (UTC); empty: any time.", check=_window_ok),
    Setting("update", "reboot", "bool", True,
            "Reboot into a downloaded update inside the window; false: only stage it."),
    Setting("output", "dpkg-database", "str", "status.d",
            "'status.d': one file per package for scanners (distroless style); "
            "'full': a real /var/lib/dpkg for images that run dpkg and apt.", choices=DPKG_DBS),
)


@dataclass(frozen=True)
class ImageDefinition:
    path: Path
    image_name: str
    image_description: str
    image_kind: str
    image_version: str
    image_architectures: tuple[str, ...]
    packages_include: tuple[str, ...]
    packages_exclude: tuple[str, ...]
    archive_mirror: str
    archive_security_mirror: str
    archive_keyring: str
    archive_suites: tuple[str, ...]
    archive_components: tuple[str, ...]
    accounts_users: tuple[Account, ...]
    config_user: str
    config_workdir: str
    config_entrypoint: tuple[str, ...]
    config_cmd: tuple[str, ...]
    config_env: Mapping[str, str] = field(default_factory=dict)
    config_labels: Mapping[str, str] = field(default_factory=dict)
    trim_docs: bool = True
    trim_man: bool = True
    trim_locales: bool = True
    trim_paths: tuple[str, ...] = ()
    output_compression: str = "gzip"
    output_dpkg_database: str = "status.d"
    system_hostname: str = "cerulean"
    system_format: str = "qcow2"
    system_kernel_cmdline: tuple[str, ...] = ()
    system_usr_slot_mib: int = 0
    system_enable: tuple[str, ...] = ()
    system_disable: tuple[str, ...] = ()
    system_setuid_allow: tuple[str, ...] = ()
    system_initrd_modules: tuple[str, ...] = ()
    system_initrd_drivers: tuple[str, ...] = ()
    system_boot_tries: int = 3
    system_read_only: bool = False
    system_agent: bool = True
    packages_cerulean: bool = False
    update_url: str = ""
    update_root: str = ""
    update_channel: str = "stable"
    update_window: str = ""
    update_reboot: bool = True

    @property
    def is_system(self) -> bool:
        return self.image_kind == "system"

    @property
    def wants_agent(self) -> bool:
        return self.is_system and self.system_agent

    @property
    def name(self) -> str:
        return self.image_name

    @property
    def keyring(self) -> Path:
        """The keyring archive signatures are checked against."""
        from cerulean.debian import KEYRING

        if not self.archive_keyring:
            return KEYRING
        return (self.path.parent / self.archive_keyring).resolve()

    @property
    def update_root_path(self) -> Path | None:
        return (self.path.parent / self.update_root).resolve() if self.update_root else None

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    def resolution_inputs(self) -> dict[str, object]:
        """What decides the lock's contents (changing anything else needs no new lock)."""
        return {
            "include": list(self.packages_include),
            "exclude": sorted(self.packages_exclude),
            "suites": list(self.archive_suites),
            "components": list(self.archive_components),
            "architectures": sorted(self.image_architectures),
            **({"essential": True} if self.is_system else {}),
            **({"agent": list(AGENT_DEPENDS)} if self.wants_agent else {}),
            **({"cerulean": list(self.extra_requests)} if self.packages_cerulean else {}),
        }

    @property
    def extra_requests(self) -> tuple[str, ...]:
        """Packages the lock resolves beyond packages.include: what Cerulean's own
        packages in the image depend on."""
        if self.wants_agent:
            return AGENT_DEPENDS
        if self.packages_cerulean:
            from cerulean.build.cerulean_deb import CERULEAN_DEPENDS

            return CERULEAN_DEPENDS
        return ()


def _convert(s: Setting, value: Any, where: str) -> Any:
    def bad(expected: str) -> DefinitionError:
        return DefinitionError(f"{where}: '{s.section}.{s.key}' must be {expected}.")

    if s.kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        out: Any = value
    elif s.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        out = value
    elif s.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a non-negative integer")
        out = value
    elif s.kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        out = tuple(value)
    elif s.kind == "table[str]":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        out = dict(sorted(value.items()))
    elif s.kind == "accounts":
        out = _accounts(value, where)
    else:  # pragma: no cover - the table above only uses the kinds handled here
        raise AssertionError(s.kind)
    if s.choices:
        vals = out if isinstance(out, tuple) else (out,)
        wrong = [v for v in vals if v not in s.choices]
        if wrong:
            raise DefinitionError(
                f"{where}: '{s.section}.{s.key}' has {wrong[0]!r}; valid: {', '.join(s.choices)}."
            )
    if s.check is not None:
        problem = s.check(out)
        if problem:
            raise DefinitionError(f"{where}: '{s.section}.{s.key}': {problem}.")
    return out


def _accounts(value: Any, where: str) -> tuple[Account, ...]:
    if not isinstance(value, list):
        raise DefinitionError(f"{where}: 'accounts.users' must be a list of tables.")
    accounts: list[Account] = []
    for i, u in enumerate(value):
        if not isinstance(u, dict) or not isinstance(u.get("name"), str) or not isinstance(
            u.get("uid"), int
        ):
            raise DefinitionError(
                f"{where}: 'accounts.users' entry {i + 1} needs a string 'name' and an "
                "integer 'uid'."
            )
        unknown = set(u) - {"name", "uid", "gid", "home", "shell", "gecos"}
        if unknown:
            raise DefinitionError(
                f"{where}: 'accounts.users' entry {i + 1} has the unknown key "
                f"'{sorted(unknown)[0]}'; valid: name, uid, gid, home, shell, gecos."
            )
        uid = u["uid"]
        if not 0 <= uid < 2**31 or not NAME_RE.match(u["name"]):
            raise DefinitionError(f"{where}: 'accounts.users' entry {i + 1} is not valid.")
        gid = u.get("gid", uid)
        if not isinstance(gid, int):
            raise DefinitionError(f"{where}: 'accounts.users' entry {i + 1} needs an integer gid.")
        home = str(u.get("home", f"/home/{u['name']}"))
        accounts.append(
            Account(u["name"], uid, gid, home, str(u.get("shell", "/sbin/nologin")),
                    str(u.get("gecos", u["name"])))
        )
    names = [a.name for a in accounts]
    if len(set(names)) != len(names) or len({a.uid for a in accounts}) != len(accounts):
        raise DefinitionError(f"{where}: 'accounts.users' has a duplicate name or uid.")
    return tuple(accounts)


def load_definition(path: Path) -> ImageDefinition:
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DefinitionError(f"The image definition {path} does not exist.") from None
    except IsADirectoryError:
        raise DefinitionError(f"The image definition {path} is a directory.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DefinitionError(f"{where} is not valid TOML: {e}.") from None
    sections = {s.section for s in SETTINGS}
    for sec, table in raw.items():
        if sec not in sections:
            raise DefinitionError(
                f"{where}: unknown section [{sec}]; valid: {', '.join(sorted(sections))}."
            )
        if not isinstance(table, dict):
            raise DefinitionError(f"{where}: '{sec}' must be a table ([{sec}]).")
        keys = {s.key for s in SETTINGS if s.section == sec}
        for k in table:
            if k not in keys:
                raise DefinitionError(
                    f"{where}: unknown key '{sec}.{k}'; valid in [{sec}]: "
                    f"{', '.join(sorted(keys))}."
                )
    values: dict[str, Any] = {}
    for s in SETTINGS:
        table = raw.get(s.section, {})
        if s.key in table:
            values[s.attr] = _convert(s, table[s.key], where)
        elif s.check is not None and s.default is not None and not s.default:
            problem = s.check(s.default)
            if problem:
                raise DefinitionError(f"{where}: '{s.section}.{s.key}': {problem}.")
            values[s.attr] = tuple(s.default) if isinstance(s.default, list) else s.default
        else:
            d = s.default
            values[s.attr] = tuple(d) if isinstance(d, list) else d
    if values["image_name"] is None:
        values["image_name"] = path.stem
        if not NAME_RE.match(path.stem):
            raise DefinitionError(f"{where}: the file name is not a valid image name.")
    if values["accounts_users"] is None:
        values["accounts_users"] = DEFAULT_ACCOUNTS
    defn = ImageDefinition(path=path, **values)
    if defn.update_url and not defn.update_root:
        raise DefinitionError(
            f"{where}: 'update.url' needs 'update.root', the repository's root.json the "
            "image trusts.")
    root = defn.update_root_path
    if root is not None and not root.is_file():
        raise DefinitionError(f"{where}: 'update.root' names {root}, which does not exist.")
    if (defn.update_url or defn.update_root) and not defn.is_system:
        raise DefinitionError(f"{where}: [update] applies to system images only.")
    if defn.packages_cerulean and defn.is_system:
        raise DefinitionError(
            f"{where}: 'packages.cerulean' applies to container images only (system images "
            "carry the cerulean-agent package: 'system.agent').")
    return defn


def settings_reference() -> str:
    """The Markdown reference of every setting (docs/image-definitions.md embeds it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "" if s.default in (None, "", [], {}) else f"`{s.default!r}`"
        choices = f" One of: {', '.join(s.choices)}." if s.choices else ""
        lines.append(f"| `{s.section}.{s.key}` | {s.kind} | {default} | {s.help}{choices} |")
    return "\n".join(lines)


def update_reference(doc: Path) -> None:
    """Rewrite the generated settings table inside *doc* (docs/image-definitions.md)."""
    text = doc.read_text()
    begin = text.index("<!-- settings:begin")
    start = text.index("\n", begin) + 1
    end = text.index("<!-- settings:end -->")
    doc.write_text(text[:start] + settings_reference() + "\n" + text[end:])


if __name__ == "__main__":  # python -m cerulean.build.definition docs/image-definitions.md
    import sys

    update_reference(Path(sys.argv[1]))
