"""Build the built-in system images and boot them: the checks a user runs by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cerulean.cli import main
from cerulean.testbed.qemu import QemuConfig

pytestmark = pytest.mark.vm
RULES = Path(__file__).parents[2] / "src/cerulean/agent/data/rules.d/cerulean.yaml"


# edge boots many times in test_updates.py, vm in test_inside_the_booted_vm.
@pytest.mark.parametrize("name", ["container-host", "metal"])
def test_builtin_system_image_boots(name: str, build_system: Callable[[str, str], Path],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cerulean test --json` as a user runs it, on a 4 GiB disk: every check passes, the
    root file system grows to fill the disk on first boot, the image is untouched."""
    disk = build_system(name, "amd64")
    before = disk.stat()
    capsys.readouterr()
    rc = main(["test", str(disk), "--json", "--log-dir", str(tmp_path), "--disk-size", "4096",
               "--timeout", "900"])
    out = json.loads(capsys.readouterr().out)
    failed = {c["name"]: c["detail"] for c in out["checks"] if not c["passed"]}
    assert rc == 0 and out["passed"] is True, f"{failed}; console log: {out['console_log']}"
    # The boot ran on a throwaway overlay: the image itself is untouched.
    after = disk.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    log = (tmp_path / f"{disk.stem}.console.log").read_text(errors="replace")
    assert "CERULEAN-READY-END" in log and "boot=systemd-boot" in log
    root_line = next(line for line in log.splitlines() if line.startswith("root=/dev/"))
    size = root_line.split()[-1]
    # It shipped at well under 1 GiB; the rest of the 4 GiB disk holds the /usr slots.
    assert size.endswith("G") and float(size[:-1]) >= 2.5, root_line
    # Writable roots here; edge's read-only root is checked in test_updates.py.
    options = next(line for line in log.splitlines() if line.startswith("root-options="))
    assert options.removeprefix("root-options=").split(",")[0] == "rw", options


def test_usr_slot_too_small_fails_cleanly(vm_env: dict[str, Path], tmp_path: Path,
                                          build_system: Callable[[str, str], Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    build_system("vm", "amd64")  # fills the session cache, so this fails fast
    work = vm_env["work"]
    small = work / "images" / "vm.toml"
    text = small.read_text().replace('format = "qcow2"', 'format = "qcow2"\nusr-slot-mib = 16')
    tiny = work / "images" / "tiny.toml"
    tiny.write_text(text)
    out = tmp_path / "out"
    old = Path.cwd()
    os.chdir(work)
    try:
        capsys.readouterr()
        rc = main(["build", "images/tiny.toml", "--arch", "amd64", "--out", str(out),
                   "--cache", str(vm_env["cache"])])
    finally:
        os.chdir(old)
        shutil.copy(work / "images" / "tiny.lock", tmp_path / "tiny.lock")
    err = capsys.readouterr().err
    assert rc == 1
    assert "system.usr-slot-mib is 16: raise it" in err and "Traceback" not in err
    assert not list(out.glob("*.qcow2")) and not list(out.glob(".tiny.*"))


@pytest.mark.parametrize("fmt, qemu_format", [("vhd", "vpc"), ("vhdx", "vhdx"), ("raw", "raw")])
def test_disk_formats(fmt: str, qemu_format: str, vm_env: dict[str, Path],
                      build_system: Callable[[str, str], Path], tmp_path: Path) -> None:
    """Every --format gives a disk qemu-img reads, a whole number of MiB (Azure's rule)."""
    import subprocess

    build_system("edge", "amd64")  # fills the cache: this build only reassembles
    old = Path.cwd()
    os.chdir(vm_env["work"])
    try:
        rc = main(["build", "images/edge.toml", "--arch", "amd64", "--format", fmt,
                   "--out", str(tmp_path), "--cache", str(vm_env["cache"])])
    finally:
        os.chdir(old)
    assert rc == 0
    disk = tmp_path / f"edge-amd64.{fmt}"
    # A fixed VHD has only a footer, which qemu-img's format probe does not look for.
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", qemu_format, "--output=json",
                                      str(disk)], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["format"] == qemu_format
    from cerulean.testbed.disk import disk_info

    assert disk_info(disk).format == qemu_format  # what cerulean test/boot would use
    assert info["virtual-size"] % (1024 * 1024) == 0
    if fmt == "vhd":
        # A fixed VHD: the file is the disk plus a 512-byte footer.
        assert disk.stat().st_size == info["virtual-size"] + 512


INSIDE = r"""
out=$1
findmnt -n -o SOURCE,FSTYPE,OPTIONS /usr > "$out/findmnt-usr"
dmsetup table --target verity > "$out/dm-verity" 2>&1
bootctl status --no-pager > "$out/bootctl" 2>&1
systemctl --failed --no-legend --plain > "$out/failed"
sshd -T 2>/dev/null | grep -Ei '^(permitrootlogin|passwordauthentication) ' > "$out/sshd"
for k in kernel.kptr_restrict kernel.dmesg_restrict kernel.unprivileged_bpf_disabled \
         net.ipv4.conf.all.rp_filter net.ipv4.conf.all.accept_redirects; do
  echo "$k=$(sysctl -n $k)"
done > "$out/sysctl"
find / \( -path /proc -o -path /sys -o -path /run -o -path /dev \) -prune -o \
     -type f \( -perm -4000 -o -perm -2000 \) -print | sort > "$out/setuid"
cat /sys/module/apparmor/parameters/enabled > "$out/apparmor"
systemctl is-active auditd > "$out/auditd"
cat /etc/machine-id > "$out/machine-id"
cat /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 > "$out/sockets"
"""


USER_DATA = """#cloud-config
users:
  - name: ops
    groups: [sudo]
    shell: /bin/bash
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    ssh_authorized_keys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFtTnYrW3h9b3Pp2Vx0Y8s6cQ8lq1n1eKJd3mB0GZyAb ops@test
write_files:
  - path: /etc/cerulean-provisioned
    content: "by NoCloud\\n"
"""


def _nocloud_seed(vm_env: dict[str, Path], dest: Path) -> None:
    """A vfat seed labelled CIDATA, made with the tools tree (the host has no mkfs.vfat)."""
    from cerulean.build.chroot import run_in
    from cerulean.build.system import overlay
    from cerulean.build.system_image import tools_tree
    from cerulean.debian.cache import Cache

    seed = dest.parent / "seed"
    seed.mkdir()
    (seed / "user-data").write_text(USER_DATA)
    (seed / "meta-data").write_text("instance-id: cerulean-test-1\nlocal-hostname: web-1\n")
    with dest.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    old = Path.cwd()
    os.chdir(vm_env["work"])
    try:
        tree = tools_tree(Cache(vm_env["cache"]), lambda _m: None, offline=False)
    finally:
        os.chdir(old)
    with overlay(tree, dest.parent / "tools") as tools:
        run_in(tools, ["mkfs.vfat", "-n", "CIDATA", "/out/seed.img"], binds={dest.parent: "/out"})
        run_in(tools, ["mcopy", "-i", "/out/seed.img", "/out/seed/user-data",
                       "/out/seed/meta-data", "::/"], binds={dest.parent: "/out"},
               env={"MTOOLS_SKIP_CHECK": "1"})


CLOUD_INIT = r"""
cloud-init status --wait --long > "$1/status" 2>&1
getent passwd ops > "$1/passwd"
cat /home/ops/.ssh/authorized_keys > "$1/keys"
cat /etc/cerulean-provisioned > "$1/written"
hostname > "$1/hostname"
"""


AGENT = r"""
out=$1
log=/var/lib/cerulean/audit/audit.jsonl
# The script may start while the agent still starts (multi-user.target does not wait
# for this script's unit): wait for it, as a user logging in early would.
i=0
until systemctl is-active -q cerulean-agent.service || [ $i -ge 600 ]; do
  sleep 0.5; i=$((i + 1))
done
systemctl is-active cerulean-agent.service cerulean-policy.timer > "$out/agent-active" 2>&1
cerulean policy list > "$out/policy-list" 2>&1
cerulean policy check --profile cis-debian-l1-server > "$out/cis-before" 2>&1
echo $? > "$out/cis-before-rc"
cerulean policy fix --profile cis-debian-l1-server > "$out/cis-fix" 2>&1
echo $? > "$out/cis-fix-rc"
cerulean policy check --profile cis-debian-l1-server --json > "$out/cis-after.json" 2>&1
cerulean policy check --profile cerulean-baseline --html "$out/baseline.html" \
    > "$out/baseline" 2>&1
echo $? > "$out/baseline-rc"
# A set-user-ID copy of a program in /tmp: the agent must notice it within seconds.
start=$(date +%s%N)
cp /usr/bin/true /tmp/.helper && chmod 4755 /tmp/.helper
i=0
until grep -q '"alert.setuid-or-setgid-file"' "$log" 2>/dev/null || [ $i -ge 300 ]; do
  sleep 0.1; i=$((i + 1))
done
echo $(( ($(date +%s%N) - start) / 1000000 )) > "$out/alert-ms"
# Six SSH logins as a user that does not exist: sshd's journal feeds the agent.
for i in 1 2 3 4 5 6; do
  ssh -n -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o ConnectTimeout=20 nosuch@127.0.0.1 true > /dev/null 2>&1
done
i=0
until grep -q '"alert.ssh-login-failures"' "$log" 2>/dev/null || [ $i -ge 300 ]; do
  sleep 0.1; i=$((i + 1))
done
# One trigger for each of the other shipped rules.
# /tmp, /var/tmp and /dev/shm are noexec here; /run/user is not.
mkdir -p /run/user/0 && cp /usr/bin/sleep /run/user/0/.sleeper && /run/user/0/.sleeper 300 &
cp /usr/bin/sleep /root/.gone && /root/.gone 300 &
sleep 1; rm -f /root/.gone
python3 -c 'import os
fd = os.memfd_create("payload")
os.write(fd, open("/usr/bin/sleep", "rb").read())
os.execve(fd, ["payload", "300"], {})' &
useradd -o -u 0 -M -s /usr/sbin/nologin toor
python3 -c 'import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 8099)); s.listen(); time.sleep(300)' &
modprobe dummy || modprobe veth
echo "# changed by the test" >> /home/ops/.ssh/authorized_keys
echo "# changed by the test" > /etc/sudoers.d/zz-test && chmod 0440 /etc/sudoers.d/zz-test
echo "# changed by the test" >> /etc/pam.d/other
i=0
until [ "$(grep -o '"alert\.[a-z0-9-]*"' "$log" | sort -u | wc -l)" -ge 11 ] || [ $i -ge 600 ]; do
  sleep 0.1; i=$((i + 1))
done
# -- fleet --
python3 -c 'import urllib.request as u, sys
sys.stdout.write(u.urlopen("http://127.0.0.1:9477/metrics").read().decode())' \
    > "$out/metrics" 2>&1
cerulean integrity check --json > "$out/integrity.json" 2>&1
echo $? > "$out/integrity-rc"
# The boot chain: one byte more in the boot loader's configuration on the ESP.
esp=$(bootctl --print-esp-path)
echo "$esp" > "$out/esp"
printf '#' >> "$esp/loader/loader.conf"
cerulean integrity check --json > "$out/integrity-boot.json" 2>&1
cerulean audit show -n 0 --json > "$out/audit-entries" 2>&1
cerulean audit verify > "$out/verify-before" 2>&1
echo $? > "$out/verify-before-rc"
# One byte of the first alert's entry changed: verify must fail and name it.
sed -i '0,/"alert\.setuid/s//"alerT.setuid/' "$log"
cerulean audit verify > "$out/verify-after" 2>&1
echo $? > "$out/verify-after-rc"
# Last, as its fixes change kernel settings and logins: the ANSSI profile.
cerulean policy check --profile anssi-bp28-intermediary --json > "$out/anssi-before.json" \
    2> "$out/anssi-before.err"
echo $? > "$out/anssi-before-rc"
cerulean policy fix --profile anssi-bp28-intermediary > "$out/anssi-fix" 2>&1
cerulean policy check --profile anssi-bp28-intermediary --json > "$out/anssi-after.json" \
    2> "$out/anssi-after.err"
echo $? > "$out/anssi-after-rc"
"""


# Enrolled in a fleet server on the host (10.0.2.2 from the guest) once its alerts are in
# the audit trail, before the test edits the trail.
FLEET = r"""
cerulean agent enroll --server {server} --token {token} --ca-sha256 {ca} \
    > "$out/fleet-enroll" 2>&1
echo $? > "$out/fleet-enroll-rc"
cerulean agent report --json > "$out/fleet-report" 2>&1
echo $? > "$out/fleet-report-rc"
cerulean update status --json > "$out/fleet-update-status" 2>&1
"""


def test_inside_the_booted_vm(vm_env: dict[str, Path],
                              build_system: Callable[[str, str], Path], tmp_path: Path) -> None:
    """The issue's by-hand checks inside the booted vm image, provisioned on this boot by
    cloud-init from a NoCloud seed disk (user, key, file, host name), enrolled in a fleet
    server that runs on this machine."""
    from cerulean.testbed.guest import run_in_guest

    disk = build_system("vm", "amd64")
    seed = tmp_path / "seed.img"
    _nocloud_seed(vm_env, seed)
    cfg = QemuConfig(extra_args=("-drive", f"if=virtio,format=raw,readonly=on,file={seed}"))
    fleet = _fleet_server(tmp_path)
    try:
        token = fleet.enrollment_token("vm-test", uses=1, environment="cloud")
        status, _ = fleet.api("POST", "/api/v1/rollouts", {
            "name": "to the future", "group": "vm-test", "target": "1.20991231.0",
            "waves": [100], "window": "daily 02:00-04:00"})
        assert status == 201
        script = AGENT.replace("# -- fleet --", FLEET.format(
            server=fleet.url.replace("localhost", "10.0.2.2"), token=token,
            ca=fleet.ca_sha256))
        run = run_in_guest(disk, INSIDE + CLOUD_INIT + script, cfg=cfg,
                           out_dir=tmp_path / "guest", timeout_s=1200)
        assert run.returncode == 0, (run.text("stderr"), run.text("status"), run.console_log)
        _fleet_checks(run, fleet)
    finally:
        fleet.stop()
    assert run.returncode == 0, (run.text("stderr"), run.text("status"), run.console_log)
    # cloud-init
    assert "status: done" in run.text("status"), run.text("status")
    assert run.text("passwd").startswith("ops:") and run.text("passwd").strip().endswith(
        ":/home/ops:/bin/bash")
    assert "ops@test" in run.text("keys")
    assert run.text("written") == "by NoCloud\n"
    assert run.text("hostname").strip() == "web-1"
    # the image's own settings
    source, fstype, options = run.text("findmnt-usr").split()
    assert source == "/dev/mapper/usr" and fstype == "erofs" and "ro" in options.split(",")
    assert " verity " in run.text("dm-verity"), run.text("dm-verity")
    bootctl = run.text("bootctl")
    assert "Product: systemd-boot" in bootctl and "Current Entry: cerulean_" in bootctl, bootctl
    assert run.text("failed").strip() == ""
    assert run.text("sshd").lower().split() == ["permitrootlogin", "no",
                                                "passwordauthentication", "no"]
    assert dict(x.split("=") for x in run.text("sysctl").split()) == {
        "kernel.kptr_restrict": "2", "kernel.dmesg_restrict": "1",
        "kernel.unprivileged_bpf_disabled": "1", "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.all.accept_redirects": "0"}
    allowed = {"/usr/bin/sudo", "/usr/bin/passwd", "/usr/bin/su", "/usr/lib/openssh/ssh-keysign"}
    assert set(run.text("setuid").split()) <= allowed, run.text("setuid")
    assert run.text("apparmor").strip() == "Y"
    assert run.text("auditd").strip() == "active"
    assert len(run.text("machine-id").strip()) == 32  # made on first boot
    # No LLMNR (5355 = 0x14EB) or mDNS (5353 = 0x14E9) responder.
    local = [line.split()[1] for line in run.text("sockets").splitlines()
             if line.strip() and line.split()[0] != "sl"]
    ports = {addr.rsplit(":", 1)[1] for addr in local}
    assert "0016" in ports  # sshd on 22: the list is real
    assert not ports & {"14EB", "14E9"}, ports
    assert run.uptime_at_start_s is not None and run.uptime_at_start_s > 0
    _agent_checks(run)


def _fleet_server(tmp_path: Path) -> Any:
    """A fleet server on this machine, whose certificate also names 10.0.2.2 (this machine
    as QEMU's user network shows it to the guest)."""
    from support.fleet_server import launch

    return launch(tmp_path, names=("localhost", "10.0.2.2"), public_url=False)


def _fleet_checks(run: Any, fleet: Any) -> None:
    """The booted vm enrolled with its token and shows up in the fleet with its packages,
    compliance scores and alerts, and follows its group's rollout."""
    assert run.text("fleet-enroll-rc").strip() == "0", run.text("fleet-enroll")
    assert run.text("fleet-report-rc").strip() == "0", run.text("fleet-report")
    report = json.loads(run.text("fleet-report"))
    assert report["failed"] == 0 and report["pending"] == 0, report
    _, page = fleet.api("GET", "/api/v1/hosts?group=vm-test")
    assert page["total"] == 1, page
    h = page["hosts"][0]
    assert (h["hostname"], h["labels"]) == ("web-1", {"environment": "cloud"}), h
    assert h["packages"] > 150 and h["os"].startswith("Cerulean"), h
    assert {"cis-debian-l1-server", "cerulean-baseline"} <= set(h["compliance"]), h
    assert h["compliance"]["cerulean-baseline"] == 100.0, h
    _, alerts = fleet.api("GET", f"/api/v1/hosts/{h['id']}/alerts?limit=1000")
    assert "setuid-or-setgid-file" in {a["rule"] for a in alerts}, alerts
    _, pkgs = fleet.api("GET", f"/api/v1/hosts/{h['id']}/packages")
    assert "cerulean-agent" in {p["name"] for p in pkgs}
    # The rollout reached the host: its updater now aims at the target only.
    status = json.loads(run.text("fleet-update-status"))
    assert (status["target"], status["hold"], status["window"]) == (
        "1.20991231.0", False, "daily 02:00-04:00"), status
    _, ro = fleet.api("GET", "/api/v1/rollouts?group=vm-test")
    assert ro[0]["hosts"] == {"updating": 1}, ro
    print(f"fleet: web-1 enrolled, {h['packages']} packages, {len(alerts)} alerts, "
          f"compliance {h['compliance']}")


def _score(text: str) -> float:
    m = re.search(r"^Score: ([0-9.]+)% ", text, re.M)
    assert m, text
    return float(m.group(1))


def _agent_checks(run: Any) -> None:
    """The issue's checks of the agent, as a user runs them on the booted vm."""
    assert run.text("agent-active").split() == ["active", "active"], run.text("agent-active")
    assert "cis-debian-l1-server" in run.text("policy-list")
    # The CIS profile: a score and per-check results; fix raises the score.
    before = run.text("cis-before")
    assert run.text("cis-before-rc").strip() == "2", before
    assert re.search(r"^FAIL  \S+ .*\[cis-debian-12 [0-9.]+\]$", before, re.M), before
    assert re.search(r"^pass  \S+ .*\[cis-debian-12 [0-9.]+\]$", before, re.M), before
    after = json.loads(run.text("cis-after.json"))
    assert after["score"] > _score(before), (before, run.text("cis-fix"))
    assert after["errors"] == 0, [c for c in after["checks"] if c["result"] == "error"]
    print(f"cis-debian-l1-server: {_score(before)}% before fix, {after['score']}% after")
    # Cerulean's own baseline passes on its own image, HTML report included.
    assert run.text("baseline-rc").strip() == "0", run.text("baseline")
    assert "Cerulean baseline on " in run.text("baseline.html")
    # Detection: the set-UID file in /tmp raised an alert within seconds.
    ms = int(run.text("alert-ms"))
    entries = [json.loads(line) for line in run.text("audit-entries").splitlines()]
    alerts = [e for e in entries if e["action"] == "alert.setuid-or-setgid-file"]
    assert alerts and alerts[0]["detail"]["evidence"]["file.path"] == "/tmp/.helper", entries
    assert ms < 10_000, ms
    print(f"setuid alert after {ms} ms")
    ssh = [e for e in entries if e["action"] == "alert.ssh-login-failures"]
    assert ssh and ssh[0]["detail"]["evidence"]["source.ip"] == "127.0.0.1", entries
    shipped = {r["rule"] for r in yaml.safe_load(RULES.read_text())}
    raised = {e["action"].removeprefix("alert.") for e in entries
              if e["action"].startswith("alert.")}
    assert raised >= shipped, f"no alert from {sorted(shipped - raised)}"
    assert any(e["action"] == "policy.fix" for e in entries)
    assert 'cerulean_alerts_total{priority="critical",rule="setuid-or-setgid-file"} 1' in \
        run.text("metrics"), run.text("metrics")
    assert 'cerulean_policy_checks{policy="cis-debian-l1-server",result="passed"}' in \
        run.text("metrics")
    assert 'cerulean_update_info{image="vm",slot="A",' in run.text("metrics")
    # The ANSSI BP-028 profile: judged, fixed where it can be, nothing unreadable.
    assert run.text("anssi-before-rc").strip() == "2", run.text("anssi-before.err")
    before_a = json.loads(run.text("anssi-before.json"))
    after_a = json.loads(run.text("anssi-after.json"))
    for doc in (before_a, after_a):
        assert doc["errors"] == 0, [c for c in doc["checks"] if c["result"] == "error"]
        assert doc["notapplicable"] > 0 and len(doc["checks"]) == 220
    assert after_a["score"] > before_a["score"], run.text("anssi-fix")
    print(f"anssi-bp28-intermediary: {before_a['score']}% before fix, {after_a['score']}% "
          f"after ({after_a['notapplicable']} not applicable)")
    # Integrity: /etc against the manifest the image carries on its verity /usr.
    report = json.loads(run.text("integrity.json"))
    assert run.text("integrity-rc").strip() == "2"
    assert (report["baseline"], report["usr_verity"]) == ("image manifest", "verified"), report
    changed = {c["path"]: c for c in report["changes"]}
    assert changed["/etc/pam.d/other"]["what"] == ["content"], changed.get("/etc/pam.d/other")
    assert changed["/etc/pam.d/other"]["package"] == "libpam-runtime"
    assert changed["/etc/sudoers.d/zz-test"]["what"] == ["added"]
    # The ESP against the image's boot manifest: as booted (the UKI renamed by boot
    # counting, a random seed written) nothing counts; one edited byte does.
    esp = run.text("esp").strip()
    assert report["boot"] == {"esp": esp, "manifest": True, "changes": []}, report["boot"]
    boot = json.loads(run.text("integrity-boot.json"))["boot"]["changes"]
    assert [(c["path"], c["what"]) for c in boot] == [(f"{esp}/loader/loader.conf",
                                                        ["content"])], boot
    # The audit trail: intact, then one edited byte is found.
    assert run.text("verify-before-rc").strip() == "0", run.text("verify-before")
    assert run.text("verify-after-rc").strip() == "1", run.text("verify-after")
    assert f"Entry {alerts[0]['seq']} (line {alerts[0]['seq']}) was edited" in \
        run.text("verify-after"), run.text("verify-after")
