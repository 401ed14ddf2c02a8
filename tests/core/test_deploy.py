"""deploy/: systemd units pass `systemd-analyze verify`, scripts pass shellcheck, and the Mosquitto
config's caps match the mesh's. Missing Debian tools are installed with deploy/system-deps.sh;
a test skips only when that is impossible (not root, no network)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
import sys
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.runner import exposure
from mesh.cache.store import KVStore, load_dir, save_dir
from mesh.config import Limits
from nodes.settings import node_config
from nodes.up import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = ("mesh-broker.service", "mesh-node@.service", "mesh-coordinator.service")
SCRIPTS = ("install.sh", "mosquitto/make-users.sh", "mosquitto/make-certs.sh", "system-deps.sh")
MESH_EXE = "/opt/mesh/.venv/bin/mesh"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        try:
            subprocess.run([str(DEPLOY / "system-deps.sh")], check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            pytest.skip(f"{name} is not installed and deploy/system-deps.sh could not install it: {exc}")
        path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed and deploy/system-deps.sh did not provide it")
    return path


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    # verify checks that ExecStart's program exists: point the units at a stand-in for the
    # venv's `mesh` (install.sh creates the real one); everything else is verified as shipped.
    fake = tmp_path / "bin" / "mesh"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        assert "[Install]" in text and "Restart=on-failure" in text, name
        (units / name).write_text(text.replace(MESH_EXE, str(fake)))
    # a template is verified through an instance of it
    (units / "mesh-node@pi1.service").write_text((units / "mesh-node@.service").read_text())
    paths = [str(units / n) for n in ("mesh-broker.service", "mesh-coordinator.service", "mesh-node@pi1.service")]
    result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=120)
    # verify exits 0 on some parse warnings ("ignoring"): any output about our units is a failure
    ours = [line for line in (result.stdout + result.stderr).splitlines() if str(units) in line or ".service" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr

    # and it does catch a broken unit (so the check above means something)
    bad = units / "broken.service"
    bad.write_text(f"[Service]\nExecStart={fake}\nRestart=sometimes\n")
    result = subprocess.run([analyze, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=60)
    assert "broken.service" in result.stdout + result.stderr


def test_node_unit_uses_the_node_name_as_username() -> None:
    text = (DEPLOY / "systemd" / "mesh-node@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M)
    assert exec_start is not None
    assert "--name %i --username %i --password-file %d/" in exec_start.group(1)
    assert "EnvironmentFile=/etc/mesh/mesh.env" in text


def test_scripts_pass_shellcheck() -> None:
    shellcheck = need_tool("shellcheck")
    paths = [str(DEPLOY / s) for s in SCRIPTS]
    result = subprocess.run([shellcheck, "--severity=style", *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for s in SCRIPTS:
        assert (DEPLOY / s).stat().st_mode & 0o111, f"{s} is not executable"
    help_text = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--help"], capture_output=True, text=True,
                               timeout=30)
    assert help_text.returncode == 0 and "--gateway" in help_text.stdout


def _conf_value(key: str) -> int:
    text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    m = re.search(rf"^{key}\s+(\d+)\s*$", text, re.M)
    assert m is not None, key
    return int(m.group(1))


def test_mosquitto_caps_match_the_mesh_limits() -> None:
    cap = Limits().max_message_bytes
    payload, packet = _conf_value("message_size_limit"), _conf_value("max_packet_size")
    # the largest mesh message passes, with the envelope's slack; a packet holds it and any topic
    assert cap <= payload <= cap + 64 * 1024
    assert packet >= payload + 5 + 2 + 65535 + 2  # fixed header, topic length + topic, packet id
    assert packet <= cap + 256 * 1024
    text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "set_tcp_nodelay true", "persistence true", "per_listener_settings false"):
        assert re.search(rf"^{line}$", text, re.M), line


def test_make_users_renders_one_acl_block_per_node(tmp_path: Path) -> None:
    need_tool("mosquitto_passwd")
    script = DEPLOY / "mosquitto" / "make-users.sh"
    subprocess.run([str(script), "-d", str(tmp_path), "-p", "ha2", "pi1", "pi-2"], check=True, capture_output=True)
    acl = (tmp_path / "acl").read_text()
    rules = "\n".join(line for line in acl.splitlines() if not line.startswith("#"))
    users = re.findall(r"^user (\S+)$", acl, re.M)
    assert users == ["homeassistant", "asker", "coordinator", "pi1", "pi-2"]
    assert "@" not in rules and "#@node" not in acl
    assert "topic readwrite mesh/v1/node/pi-2/#" in acl and "topic readwrite mesh/v1/reply/node-pi1" in acl
    assert "topic write ha2/device/mesh_node_pi1/config" in acl and "topic readwrite ha2/#" in acl
    assert not re.search(r"^pattern ", acl, re.M)  # patterns would apply to every user
    passwd = (tmp_path / "passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in passwd] == users
    first = (tmp_path / "secrets" / "pi1.password").read_text()
    # re-running (to add a node) keeps the existing passwords
    subprocess.run([str(script), "-d", str(tmp_path), "pi1", "pi-2", "pi3"], check=True, capture_output=True)
    assert (tmp_path / "secrets" / "pi1.password").read_text() == first
    assert re.findall(r"^user (\S+)$", (tmp_path / "acl").read_text(), re.M)[-1] == "pi3"
    for bad in ("asker", "bad/name", "-x"):
        result = subprocess.run([str(script), "-d", str(tmp_path), bad], capture_output=True, text=True)
        assert result.returncode != 0, bad


def test_make_certs_makes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    openssl = need_tool("openssl")
    script = DEPLOY / "mosquitto" / "make-certs.sh"
    subprocess.run([str(script), "-d", str(tmp_path), "gateway.local", "192.168.1.2"], check=True,
                   capture_output=True)
    ca = (tmp_path / "ca.crt").read_bytes()
    verify = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run([openssl, "x509", "-in", str(tmp_path / "server.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:gateway.local" in san and "IP Address:192.168.1.2" in san
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    # a second run renews the server certificate under the same CA
    subprocess.run([str(script), "-d", str(tmp_path), "gateway.local"], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == ca


def _listeners(conf: str) -> list[tuple[int, str | None, dict[str, str]]]:
    """(port, bind address or None for every interface, the block's settings) per listener."""
    blocks: list[tuple[int, str | None, dict[str, str]]] = []
    for line in conf.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            blocks.append((int(words[1]), words[2] if len(words) > 2 else None, {}))
        elif blocks:
            blocks[-1][2][words[0]] = " ".join(words[1:])
    return blocks


def test_plain_mqtt_only_on_loopback_and_the_docs_default_to_tls() -> None:
    """H4: a listener without TLS binds a loopback address; the TLS listener is the way in from the
    LAN; the shipped environment and the docs point nodes, operators and Home Assistant at 8883."""
    listeners = _listeners((DEPLOY / "mosquitto" / "mosquitto.conf").read_text())
    assert {port for port, _, _ in listeners} == {1883, 8883}
    for port, bind, settings in listeners:
        if "certfile" in settings:
            assert {"cafile", "keyfile"} <= set(settings) and settings["tls_version"] in ("tlsv1.2", "tlsv1.3")
        else:
            assert bind is not None and ipaddress.ip_address(bind).is_loopback, (port, bind)
    env = (DEPLOY / "systemd" / "mesh.env.example").read_text()
    assert re.search(r"^MESH_BROKER=gateway\.local:8883$", env, re.M)
    assert re.search(r"^MESH_TLS_CA=/etc/mesh/ca\.crt$", env, re.M)
    for doc in ("README.md", "HOME_ASSISTANT.md"):
        text = (DEPLOY / doc).read_text()
        off_box = [m.group(0) for m in re.finditer(r"([\w.-]+):1883\b", text)
                   if m.group(1) not in ("127.0.0.1", "localhost")]
        assert off_box == [], f"{doc} sends clients to plain MQTT off the box: {off_box}"
        assert "8883" in text


def _unit_environment(unit: str, instance: str = "pi1") -> dict[str, str]:
    """What systemd hands the unit's process: its Environment= lines, then mesh.env.example as
    /etc/mesh/mesh.env (EnvironmentFile= comes later and wins)."""
    env: dict[str, str] = {}
    text = (DEPLOY / "systemd" / unit).read_text().replace("%i", instance)
    for m in re.finditer(r"^Environment=(\w+)=(.*)$", text, re.M):
        env[m.group(1)] = m.group(2)
    assert "EnvironmentFile=/etc/mesh/mesh.env" in text
    for line in (DEPLOY / "systemd" / "mesh.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_the_deployed_units_keep_models_in_mesh_home_and_persist_no_kv() -> None:
    """M3: the deploy files meant MESH_CACHE_DIR as the model directory, the code read it as the
    prompt cache's persistence directory, so every systemd node wrote fp32 KV to the SD card."""
    env = _unit_environment("mesh-node@.service")
    config = node_config(argparse.Namespace(name="pi1"), env)
    assert config.home == Path("/var/cache/mesh")
    assert config.cache.persist_dir is None
    for unit in UNITS:
        assert "MESH_CACHE_DIR" not in (DEPLOY / "systemd" / unit).read_text(), unit
    install = (DEPLOY / "install.sh").read_text()
    assert "MESH_HOME=/var/cache/mesh" in install and "env HF_HUB_OFFLINE=1 MESH_CACHE_DIR" not in install


def test_kv_persistence_is_opt_in_under_an_unambiguous_name(caplog: pytest.LogCaptureFixture) -> None:
    base = {"MESH_NODE_NAME": "pi1"}
    assert node_config(argparse.Namespace(), base).cache.persist_dir is None
    kv = node_config(argparse.Namespace(), {**base, "MESH_KV_DIR": "/var/cache/mesh/kv/pi1"})
    assert kv.cache.persist_dir == Path("/var/cache/mesh/kv/pi1")
    flag = node_config(argparse.Namespace(cache_dir="/tmp/kv"), {**base, "MESH_KV_DIR": "/elsewhere"})
    assert flag.cache.persist_dir == Path("/tmp/kv")
    with caplog.at_level("WARNING", logger="nodes.settings"):
        legacy = node_config(argparse.Namespace(), {**base, "MESH_CACHE_DIR": "/var/cache/mesh"})
    assert legacy.cache.persist_dir is None
    assert "ignoring MESH_CACHE_DIR=/var/cache/mesh" in caplog.text and "MESH_KV_DIR" in caplog.text


def test_persisted_kv_is_readable_by_the_node_user_only(tmp_path: Path) -> None:
    """M1 (at rest): persisted KV decodes back to the prompts, so files are 0600 in a 0700
    directory whatever the umask; files and a directory left by an older version are tightened."""
    model = b"m" * 16
    store = KVStore(1 << 20, model)
    first, second = b"\x01" * 16, b"\x02" * 16
    assert store.put_chunk(first, None, b"kv of chunk one", 15).added
    old_umask = os.umask(0o022)
    try:
        kv_dir = tmp_path / "kv" / "pi1"
        assert save_dir(store, kv_dir, bytes) == 1
        assert stat.S_IMODE(kv_dir.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in kv_dir.iterdir()} == {first.hex() + ".kv": 0o600}
        # as an older version left it: the umask's modes
        kv_dir.chmod(0o755)
        (kv_dir / (first.hex() + ".kv")).chmod(0o644)
        loaded = KVStore(1 << 20, model)
        report = load_dir(loaded, kv_dir, bytes)
        assert report.skipped == () and first in loaded
        assert stat.S_IMODE((kv_dir / (first.hex() + ".kv")).stat().st_mode) == 0o600
        assert loaded.put_chunk(second, first, b"kv of chunk two", 15).added
        (kv_dir / (second.hex() + ".kv.tmp")).write_bytes(b"a leftover of a crash")  # 0644
        assert save_dir(loaded, kv_dir, bytes) == 1
        assert stat.S_IMODE(kv_dir.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in kv_dir.glob("*.kv")} == {0o600}
    finally:
        os.umask(old_umask)


def _unit_settings(unit: str) -> dict[str, str]:
    text = (DEPLOY / "systemd" / unit).read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)=(.*)$", text, re.M)}


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", size)
    assert m is not None, size
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))


# RSS measured for issue 16 (deploy/README.md, "Memory"): a Gemma-3 node with its 256 MiB cache
# full, the SmolLM2 HALO coordinator.
MEASURED_MIB = {"mesh-node@.service": 1970, "mesh-coordinator.service": 1330}


def test_units_cap_memory_and_never_outrank_the_gateway() -> None:
    """H5 (the unit's part): a node on a gateway ran at Nice=-5 with no memory cap, next to Mosquitto
    and Home Assistant. Every unit now has a MemoryMax above what its role was measured to use,
    the mesh's processes are the OOM killer's first pick, and no unit has a negative Nice."""
    for unit in UNITS:
        settings = _unit_settings(unit)
        assert "MemoryMax" in settings, unit
        assert int(settings.get("Nice", "0")) >= 0, unit
        if unit in MEASURED_MIB:
            assert _bytes(settings["MemoryMax"]) >= 1.2 * MEASURED_MIB[unit] * 2**20, unit
            assert settings["MemorySwapMax"] == "0" and int(settings["OOMScoreAdjust"]) > 0, unit
    assert int(_unit_settings("mesh-broker.service")["OOMScoreAdjust"]) < 0
    readme = (DEPLOY / "README.md").read_text()
    for unit in UNITS:
        assert re.search(rf"`{re.escape(unit)}`.*MemoryMax={_unit_settings(unit)['MemoryMax']}", readme), unit


def _source_install(script: str, tmp_path: Path, fake: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Source install.sh (its main does not run) and run ``script`` with its functions; ``fake``
    maps a command name to what it prints, through stand-ins first on PATH."""
    env = dict(os.environ)
    if fake:
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        for name, out in fake.items():
            (bin_dir / name).write_text(f"#!/bin/sh\necho '{out}'\n")
            (bin_dir / name).chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f'source "$1"; {script}', "bash", str(DEPLOY / "install.sh")],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("machine,bits,ok", [
    ("x86_64", "64", True), ("aarch64", "64", True),
    ("armv7l", "32", False),   # Raspberry Pi OS 32-bit
    ("aarch64", "32", False),  # a 64-bit kernel under a 32-bit userland
    ("armv6l", "32", False),   # Pi Zero W, Pi 1
    ("i686", "32", False),
])
def test_install_refuses_a_32_bit_os(tmp_path: Path, machine: str, bits: str, ok: bool) -> None:
    """Issue 16: PyPI has no 32-bit ARM torch wheels, so install.sh says so before installing."""
    result = _source_install("check_platform && echo platform-ok", tmp_path, {"uname": machine, "getconf": bits})
    if ok:
        assert result.returncode == 0 and result.stdout.strip() == "platform-ok", result.stderr
    else:
        assert result.returncode == 1 and "platform-ok" not in result.stdout
        assert f"32-bit system (uname -m: {machine}, getconf LONG_BIT: {bits})" in result.stderr
        assert "64-bit OS" in result.stderr and "torch" in result.stderr


def test_install_writes_mesh_env_readable_by_root_only(tmp_path: Path) -> None:
    """L5: /etc/mesh/mesh.env was installed 0644; it is 0600 now, and an older one is tightened
    (and its MESH_CACHE_DIR line renamed MESH_HOME, M3)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    result = _source_install(f'etc="{etc}"; write_env', tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((etc / "mesh.env").stat().st_mode) == 0o600
    assert (etc / "mesh.env").read_text() == (DEPLOY / "systemd" / "mesh.env.example").read_text()
    (etc / "mesh.env").write_text("MESH_BROKER=gateway.local:1883\nMESH_CACHE_DIR=/var/cache/mesh\n")
    (etc / "mesh.env").chmod(0o644)
    result = _source_install(f'etc="{etc}"; broker=gateway.local:8883; write_env', tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((etc / "mesh.env").stat().st_mode) == 0o600
    assert (etc / "mesh.env").read_text() == "MESH_BROKER=gateway.local:8883\nMESH_HOME=/var/cache/mesh\n"


@pytest.mark.parametrize("host,exposed", [
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("localhost", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.2", True), ("gateway.local", True),
])
def test_exposure_of_the_embedded_broker(host: str, exposed: bool) -> None:
    warning = exposure(host)
    assert (warning is not None) == exposed
    if exposed:
        assert "no password, no ACL and no TLS" in warning
        assert ("every interface" in warning) == (host in ("0.0.0.0", "::"))


def test_the_embedded_broker_warns_before_it_listens_beyond_loopback() -> None:
    """M10: `mesh broker --host` (and `mesh up --host`, which runs it) bound any address without a
    word. 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes first, then the
    bind fails cleanly, and no port is ever opened to the network by this test."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "nodes.cli", "broker", "--host", "192.0.2.1", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    warned = result.stderr.index("listens on 192.0.2.1 ('192.0.2.1') with no password, no ACL and no TLS")
    assert warned < result.stderr.index("mesh broker: the embedded broker did not start on 192.0.2.1:")
    # on loopback: no warning
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nodes.cli", "broker", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == f"broker ready on 127.0.0.1:{port}"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "no password" not in err, err


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_install_takes_torch_from_the_cpu_index_on_both_platforms(tmp_path: Path, machine: str) -> None:
    """PyPI's aarch64 torch 2.13.0 is the CUDA build (issue 16): install.sh took PyTorch's CPU index
    on x86_64 only, so a Pi got 4.6 GB of NVIDIA libraries while the script said "CPU build"."""
    result = _source_install("torch_index", tmp_path, {"uname": machine, "getconf": "64"})
    assert result.returncode == 0 and result.stdout.strip() == "https://download.pytorch.org/whl/cpu", result.stderr
    result = _source_install("TORCH_INDEX_URL=https://mirror.example/whl torch_index", tmp_path, {"uname": machine})
    assert result.stdout.strip() == "https://mirror.example/whl"
