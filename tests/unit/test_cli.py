"""The command line: help that teaches, and one clear sentence on bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cerulean.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("images", "lock", "build"):
        assert cmd in out


def test_images_lists_builtins(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["images", "--json"]) == 0
    import json

    names = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(names) >= {"static", "base", "python", "core"}
    assert all(d["description"] for d in names.values())


@pytest.mark.parametrize(
    "toml, words",
    [
        ("[image]\nname = 'x'\n", "'packages.include': at least one package is needed"),
        ("[packages]\ninclude = ['a']\n[bogus]\n", "unknown section [bogus]"),
        ("[packages]\ninclude = ['a']\nincludes = ['b']\n", "unknown key 'packages.includes'"),
        ("[packages]\ninclude = 'a'\n", "'packages.include' must be a list of strings"),
        ("[packages]\ninclude = ['a']\n[image]\narchitectures = ['s390x']\n",
         "'image.architectures' has 's390x'; valid: amd64, arm64"),
        ("[packages]\ninclude = ['a']\n[output]\ncompression = 'lz4'\n", "valid: gzip, zstd"),
        ("[packages\n", "is not valid TOML"),
        ("[packages]\ninclude = ['a']\n[accounts]\nusers = [{name = 'a'}]\n",
         "needs a string 'name' and an integer 'uid'"),
        ("[packages]\ninclude = ['a']\n[config]\nworkdir = 'rel'\n", "not an absolute path"),
    ],
)
def test_bad_definitions_fail_with_one_sentence(tmp_path: Path, toml: str, words: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "img.toml"
    d.write_text(toml)
    rc = main(["lock", str(d), "--cache", str(tmp_path / "c"), "--offline"])
    err = capsys.readouterr().err
    assert rc == 1
    assert words in " ".join(err.split()), err
    assert str(d) in " ".join(err.split()).replace("\n", "")
    assert "Traceback" not in err
    assert not (tmp_path / "img.lock").exists()


def test_missing_definition(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["build", "no-such-image", "--cache", str(tmp_path)]) == 1
    assert "no image definition 'no-such-image'" in capsys.readouterr().err


def test_locked_without_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "img.toml"
    d.write_text("[packages]\ninclude = ['a']\n")
    assert main(["build", str(d), "--locked", "--cache", str(tmp_path / "c")]) == 1
    assert "--locked was given but" in capsys.readouterr().err


def test_bad_arch_option(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                         ) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["build", "base", "--arch", "mips"]) == 1
    assert "--arch 'mips' is not valid" in capsys.readouterr().err


def test_entry_point_runs() -> None:
    r = subprocess.run([Path(sys.executable).parent / "cerulean", "--version"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("cerulean ")


SIGTERM_PROBE = """
import asyncio, sys, time
from pathlib import Path
import uvloop
from cerulean.cli import images, main

async def tick():
    while True:
        await asyncio.sleep(0.05)

async def loop():
    task = asyncio.create_task(tick())
    await asyncio.sleep(60)

def run(args):
    try:
        print("running", flush=True)
        if sys.argv[2] == "loop":
            uvloop.run(loop())
        else:
            time.sleep(60)
    finally:
        Path(sys.argv[1]).write_text("cleaned up")
    return 0

images.run = run
sys.exit(main(["images"]))
"""


# "loop": an event loop (the fleet simulator's uvloop) logs and drops an exception its
# callbacks raise, but SystemExit's, while a task runs.
@pytest.mark.parametrize("waits", ["sleep", "loop"])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path, waits: str) -> None:
    """A command stopped with SIGTERM unwinds (its finally blocks run: mounts, temporary
    trees, VMs and servers are cleaned up), says one word, no traceback, and still
    ends by the signal (what systemd counts as a clean stop)."""
    marker = tmp_path / "marker"
    with subprocess.Popen([sys.executable, "-c", SIGTERM_PROBE, str(marker), waits],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "running\n"
            time.sleep(0.3)  # into the loop
            proc.terminate()
            _, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert err.strip() == "terminated"
    assert marker.read_text() == "cleaned up"


def test_main_puts_the_sigterm_handler_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.cli import images

    monkeypatch.chdir(ROOT)
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run(args: object) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    monkeypatch.setattr(images, "run", run)
    assert main(["images"]) == 0
    assert seen and seen[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before
