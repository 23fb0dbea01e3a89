"""macnat as a service sees it, in the lab: the settings file and its precedence, a bad file,
SIGHUP reloading without dropping a packet, what it tells systemd over $NOTIFY_SOCKET, and its log
as JSON lines or with journald priorities. (The real systemd runs it in the VM test.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from macnat import config, lab
from macnat.lab import MACNAT, RunningManager, macnat, ping
from test_attach import VM1, macnat_objects, table, wait_for


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- settings: file, environment, command line --------------------------------------------------

def test_precedence_is_command_line_then_environment_then_file_then_defaults(tmp_path):
    path = write_config(tmp_path / "wlan0.toml", 'bridge = "vmbr0"\nage = 120\nlog_format = "json"\n'
                        '[static]\n"192.168.77.60" = "52:54:00:00:01:02"\n')
    env = {"MACNAT_AGE": "60", "MACNAT_LOG_FORMAT": "text", "MACNAT_NETWORK_CHANGE_ACTION": "hook"}
    resolved = config.resolve("wlan0", {"age": 30.0}, path=path, environ=env)
    s = resolved.settings
    assert (s.bridge, s.age, s.log_format, s.network_change, s.dhcp) == ("vmbr0", 30.0, "text", "hook", "keep")
    assert s.statics == {"192.168.77.60": "52:54:00:00:01:02"}
    assert resolved.sources["age"] == "command line"
    assert resolved.sources["log_format"] == resolved.sources["network_change"] == "environment"
    assert resolved.sources["bridge"] == resolved.sources["statics"] == str(path)
    assert resolved.sources["dhcp"] == "default"
    without_cli = config.resolve("wlan0", {}, path=path, environ=env).settings
    assert without_cli.age == 60.0
    assert config.resolve("wlan0", {}, path=path, environ={}).settings.age == 120.0
    assert config.resolve("wlan0", {}, path=tmp_path / "none.toml", environ={}).settings == config.Settings()


@pytest.mark.parametrize("text, message", [
    ('bridge = "vmbr0"\nage = -1\n', "age must be a positive number of seconds, not -1"),
    ('bridge = "vmbr0"\nagee = 3\n', "unknown key 'agee'"),
    ('bridge = "vmbr0"\n[network_change]\naction = "reboot"\n', "network_change.action must be one of 'bounce', 'hook', 'nothing', not 'reboot'"),
    ('bridge = "vmbr0"\n[static]\n"192.168.77.5" = "zz"\n', "static 'zz' is not a MAC address"),
    ('bridge = "vmbr0"\n[metrics]\nlisten = "localhost"\n', "metrics.listen must be ADDRESS:PORT"),
    ('bridge = vmbr0\n', "not valid TOML"),
], ids=["negative-age", "unknown-key", "bad-choice", "bad-mac", "bad-listen", "not-toml"])
def test_a_bad_config_file_is_one_line_naming_file_and_key_and_exit_78(tmp_path, text, message):
    path = write_config(tmp_path / "wlan0.toml", text)
    proc = subprocess.run([MACNAT, "attach", "wlan0", "--config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == config.EX_CONFIG == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"macnat: error: {path}: ") and message in lines[0], proc.stderr


def test_a_bad_environment_variable_is_named(tmp_path):
    proc = subprocess.run([MACNAT, "attach", "wlan0", "vmbr0", "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, env={**os.environ, "MACNAT_AGE": "soon"}, timeout=60)
    assert proc.returncode == 78
    assert proc.stderr.strip() == "macnat: error: environment: MACNAT_AGE must be a number, not 'soon'"


def test_no_bridge_anywhere_is_a_config_error(tmp_path):
    proc = subprocess.run([MACNAT, "attach", "wlan0", "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "no bridge for wlan0: give it (macnat attach wlan0 vmbr0) or set bridge in" in proc.stderr


def test_config_write_then_attach_with_the_bridge_from_the_file(tmp_path):
    lab.up()
    env = {**os.environ, "MACNAT_CONFIG_DIR": str(tmp_path)}
    try:
        wrote = subprocess.run([MACNAT, "config", "write", "wlan0", "vmbr0", "--static", f"192.168.77.60={VM1.mac}"],
                               capture_output=True, text=True, env=env, check=True).stdout
        assert f"wrote {tmp_path / 'wlan0.toml'}" in wrote
        shown = json.loads(subprocess.run([MACNAT, "config", "show", "wlan0", "--json"], capture_output=True,
                                          text=True, env=env, check=True).stdout)
        assert shown["settings"]["bridge"] == {"value": "vmbr0", "from": str(tmp_path / "wlan0.toml")}
        again = subprocess.run([MACNAT, "config", "write", "wlan0", "vmbr0"], capture_output=True, text=True, env=env)
        assert again.returncode == 1 and "exists (--force replaces it)" in again.stderr
        manager = RunningManager(log=tmp_path / "manager.log", bridge=None, env=env)
        try:
            assert table()["192.168.77.60"]["kind"] == "static"
            assert lab.dhcp("vm1") and ping(VM1.ns, lab.LANHOST.ip)
        finally:
            assert manager.stop() == 0
    finally:
        lab.down()


# ---- reload ---------------------------------------------------------------------------------

def test_sighup_reloads_statics_and_ageing_without_dropping_a_packet(tmp_path):
    lab.up()
    path = write_config(tmp_path / "wlan0.toml", 'bridge = "vmbr0"\n[static]\n"192.168.77.60" = "52:54:00:00:01:02"\n')
    manager = RunningManager("--config", str(path), log=tmp_path / "manager.log", bridge=None)
    try:
        ip = lab.dhcp("vm1")
        assert ping(lab.LANHOST.ns, ip)
        flood = lab.LANHOST.ns.spawn("ping", "-n", "-q", "-i", "0.01", "-c", "300", ip, log=tmp_path / "ping.log")
        time.sleep(0.5)
        write_config(path, 'bridge = "vmbr0"\nage = 120\n[static]\n"192.168.77.61" = "52:54:00:00:01:01"\n')
        manager.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: f"reloaded {path}" in manager.text(), timeout=5), manager.text()
        assert flood.wait(20) == 0
        assert " 0% packet loss" in (tmp_path / "ping.log").read_text(), (tmp_path / "ping.log").read_text()
        rows = table()
        assert rows["192.168.77.61"]["kind"] == "static" and "192.168.77.60" not in rows
        assert "age 300.0 -> 120.0" in manager.text()
        write_config(path, 'bridge = "vmbr0"\nage = "soon"\n')  # a bad file keeps what runs
        manager.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed, keeping the running settings" in manager.text(), timeout=5)
        assert manager.proc.poll() is None and ping(lab.LANHOST.ns, ip)
    finally:
        assert manager.stop() == 0
        lab.down()


# ---- sd_notify ------------------------------------------------------------------------------

class NotifySocket:
    """What systemd listens on for a Type=notify service: $NOTIFY_SOCKET, a datagram socket."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def receive(self) -> list[str]:
        while True:
            try:
                self.messages += self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                return self.messages


def test_notify_ready_status_reloading_stopping(tmp_path):
    lab.up()
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    manager = RunningManager(log=tmp_path / "manager.log", env=env)
    try:
        assert wait_for(lambda: "READY=1" in notify.receive(), timeout=5)
        statuses = [m for m in notify.messages if m.startswith("STATUS=")]
        assert statuses and statuses[-1].startswith("STATUS=0 VMs, 0 bindings on 192.168.77.0/24")
        lab.dhcp_all()
        assert wait_for(lambda: "STATUS=2 VMs, 2 bindings on 192.168.77.0/24 via 192.168.77.1" in notify.receive()
                        or any(m.startswith("STATUS=2 VMs") for m in notify.messages), timeout=15), notify.messages
        manager.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "RELOADING=1" in notify.receive(), timeout=5)
        lab.unplug()
        assert wait_for(lambda: "STATUS=waiting for wlan0" in notify.receive(), timeout=5)
        assert notify.messages.count("READY=1") == 2, "once at start, once after the reload"
    finally:
        manager.stop()
        assert "STOPPING=1" in notify.receive()
        lab.down()


def test_ready_waits_until_the_datapath_forwards(tmp_path):
    """With --wait and no Wi-Fi yet, the service is not READY: systemd still shows it activating."""
    lab.up()
    lab.unplug()
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    manager = RunningManager("--wait", log=tmp_path / "manager.log", env=env)
    try:
        assert wait_for(lambda: "STATUS=waiting for wlan0" in notify.receive(), timeout=5)
        assert "READY=1" not in notify.messages
        lab.plug()
        assert wait_for(lambda: "READY=1" in notify.receive(), timeout=5)
    finally:
        manager.stop()
        lab.down()


# ---- logs ---------------------------------------------------------------------------------

def test_json_log_lines_carry_the_events(tmp_path):
    lab.up()
    manager = RunningManager("--log-format", "json", log=tmp_path / "manager.log")
    try:
        ip = lab.dhcp("vm1")
        assert wait_for(lambda: f'"ip": "{ip}"' in manager.text(), timeout=5)
        lab.replug()
        assert wait_for(lambda: '"event": "wifi_attached"' in manager.text(), timeout=5)
    finally:
        manager.stop()
        lab.down()
    entries = [json.loads(line) for line in manager.text().splitlines()]
    gone = next(e for e in entries if e.get("event") == "wifi_gone")
    back = next(e for e in entries if e.get("event") == "wifi_attached")
    assert gone["level"] == "warning" and back["again"] is True and back["wifi"] == "wlan0"
    assert {"time", "level", "message"} <= set(entries[0])
    learned = next(e for e in entries if e.get("event") == "learned" and e["ip"] == ip)
    assert learned == {**learned, "level": "info", "mac": VM1.mac, "message": f"learned {ip} at {VM1.mac}"}
    assert any(e.get("event") == "network" and e["subnet"] == "192.168.77.0/24" for e in entries)
    assert entries[-1]["message"] == "detached from wlan0"


def test_log_lines_carry_journal_priorities_when_stderr_is_the_journal(tmp_path):
    """systemd names the stream it connected to stderr in $JOURNAL_STREAM; macnat then prefixes each
    line with its syslog priority (<4> warning, <6> info), which journald reads, and drops the time."""
    lab.up()
    log = tmp_path / "manager.log"
    log.touch()
    st = os.stat(log)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    manager = RunningManager(log=log, env=env)
    try:
        lab.unplug()
        assert wait_for(lambda: "<4>wlan0 is gone" in manager.text(), timeout=5), manager.text()
    finally:
        manager.stop()
        lab.down()
    lines = manager.text().splitlines()
    assert "<6>managing wlan0 <-> vmbr0" in "\n".join(lines)
    assert all(line.startswith(("<3>", "<4>", "<6>", "<7>")) for line in lines if not line.startswith("Exception")), lines


def test_attach_with_a_bad_config_changes_nothing_that_runs(tmp_path):
    lab.up()
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        before = macnat_objects()
        path = write_config(tmp_path / "wlan0.toml", "age = 0\n")
        proc = macnat("attach", "wlan0", "--config", str(path), check=False)
        assert proc.returncode == 78
        assert macnat_objects() == before and manager.proc.poll() is None
    finally:
        manager.stop()
        lab.down()
