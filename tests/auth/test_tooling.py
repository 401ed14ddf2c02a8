"""The tooling that makes identities: the gateway's make-users.sh, `mesh identity`, `mesh up`."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.auth import store
from mesh.auth.certs import verify_peer
from mesh.errors import ConfigError, ProtocolError
from nodes.up import MeshProcesses
from tests.conftest import ENV, REPO
from tests.core.test_deploy import need_tool


def modes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): stat.S_IMODE(p.stat().st_mode) for p in [d, *d.rglob("*")]}


def peer_of(d: Path, name: str):
    ident = store.load_identity(d, name, store.load_ca_cert(d))
    return verify_peer(ident.cert_der, store.load_ca_cert(d), store.load_crl(d, store.load_ca_cert(d)))


def test_make_users_issues_an_identity_per_account(tmp_path: Path) -> None:
    need_tool("mosquitto_passwd")
    script = REPO / "deploy" / "mosquitto" / "make-users.sh"
    subprocess.run([str(script), "-d", str(tmp_path), "-y", sys.executable, "pi1", "pi-2"], check=True,
                   capture_output=True, env=ENV)
    d = tmp_path / "identity"
    assert {n: peer_of(d, n).role for n in ("asker", "coordinator", "pi1", "pi-2")} == {
        "asker": "asker", "coordinator": "coordinator", "pi1": "node", "pi-2": "node"}
    assert not (d / "homeassistant.crt").exists()  # Home Assistant cannot sign: the ACL guards it
    assert store.catalog_key_holders(d) == ["pi-2", "pi1"]  # nodes only: not the asker, not the coordinator
    assert all(m == (0o700 if (tmp_path / "identity" / p).is_dir() else 0o600) for p, m in modes(d).items())
    serial = peer_of(d, "pi1").serial
    # re-running (to add a node) keeps the identities, like the passwords
    subprocess.run([str(script), "-d", str(tmp_path), "-y", sys.executable, "pi1", "pi-2", "pi3"], check=True,
                   capture_output=True, env=ENV)
    assert peer_of(d, "pi1").serial == serial and peer_of(d, "pi3").role == "node"


def test_identity_cli_issue_revoke_show(tmp_path: Path) -> None:
    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "nodes.identity_cli", *args, "--dir", str(tmp_path)],
                              check=True, capture_output=True, text=True, env=ENV, cwd=REPO).stdout

    issued = [json.loads(line) for line in cli("issue", "--role", "node", "pi1", "pi2").splitlines()]
    assert [i["name"] for i in issued] == ["pi1", "pi2"]
    before = json.loads(cli("show"))
    assert {i["name"]: i["catalog_key"] for i in before["identities"]} == {"pi1": before["catalog_key"],
                                                                           "pi2": before["catalog_key"]}
    revoked = json.loads(cli("revoke", "pi1"))
    assert revoked["number"] == 1 and revoked["catalog_key_rotated"] is True
    assert revoked["recopy"] == [str(tmp_path / "pi2.catalog-key")]
    shown = json.loads(cli("show"))
    assert {i["name"]: i["revoked"] for i in shown["identities"]} == {"pi1": True, "pi2": False}
    assert shown["catalog_key"] != before["catalog_key"]  # the stolen Pi's key tests nothing any more
    assert {i["name"]: i["catalog_key"] for i in shown["identities"]} == {"pi1": None, "pi2": shown["catalog_key"]}
    rotated = json.loads(cli("rotate"))
    assert rotated["recopy"] == [str(tmp_path / "pi2.catalog-key")] and rotated["catalog_key"] != shown["catalog_key"]
    assert shown["crl"]["revoked"] == [issued[0]["serial"]]
    keys = store.load_keyring(tmp_path, "pi2")
    assert keys is not None
    with pytest.raises(ProtocolError, match="cert-revoked"):
        keys.peer(store.load_identity(tmp_path, "pi1", keys.ca).cert_der)


def test_mesh_up_makes_a_throwaway_ca_once_and_reuses_it(tmp_path: Path) -> None:
    procs = MeshProcesses(["node1", "node2"], "smollm2-135m", 1883, home=tmp_path, coordinator=True)
    procs.make_identities()
    d = store.identity_dir(tmp_path)
    first = {n: peer_of(d, n).serial for n in ("node1", "node2", "coordinator", "asker")}
    assert peer_of(d, "coordinator").role == "coordinator"
    procs.make_identities()
    assert {n: peer_of(d, n).serial for n in first} == first
    assert all(m == (0o700 if (d / p).is_dir() else 0o600) for p, m in modes(d).items())


def test_mesh_up_leaves_a_gateway_issued_directory_alone(tmp_path: Path) -> None:
    gateway = tmp_path / "gateway"
    store.issue(gateway, "node1", "node")
    d = store.identity_dir(tmp_path / "home")
    d.mkdir(parents=True)
    for f in ("ca.crt", "node1.crt", "node1.key"):
        (d / f).write_bytes((gateway / f).read_bytes())
    MeshProcesses(["node1", "node2"], "smollm2-135m", 1883, home=tmp_path / "home").make_identities()
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "node1.crt", "node1.key"]
    assert store.load_keyring(d, "node1") is not None and store.load_keyring(d, "node2") is None
    with pytest.raises(ConfigError):
        store.issue(d, "node2", "node")  # never a second CA over the gateway's certificate


def test_processes_enrolling_at_once_get_one_consistent_identity(tmp_path: Path) -> None:
    """Every process of one box may enrol on its first start at the same moment (mesh up, a test
    suite): the issuer lock gives them one identity, never a key beside another's certificate."""
    store.init_ca(tmp_path)
    code = ("import sys; from mesh.auth.store import load_keyring; "
            "k = load_keyring(sys.argv[1], 'w1'); print(k.identity.serial)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=REPO) for _ in range(6)]
    serials = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(serials) == 1
    assert f"{store.load_keyring(tmp_path, 'w1').identity.serial}" in serials


def test_the_catalog_key_goes_to_node_identities_only_and_a_revoked_holder_rotates_it(tmp_path: Path) -> None:
    """Review finding M1: catalogs are keyed with a secret of the mesh (mesh.cache.catalog); the CA
    hands it to nodes only, and a stolen node's copy stops working when it is revoked."""
    d = store.identity_dir(tmp_path)
    for name, role in (("pi1", "node"), ("pi2", "node"), ("asker", "asker"), ("coordinator", "coordinator")):
        store.issue(d, name, role)
    assert store.catalog_key_holders(d) == ["pi1", "pi2"]
    assert all(m == (0o700 if (d / p).is_dir() else 0o600) for p, m in modes(d).items())

    def key_of(name: str, role: str = "node", directory: Path = d) -> bytes | None:
        keys = store.load_keyring(directory, name, role, enrol=False)
        assert keys is not None
        return keys.catalog_key

    first = key_of("pi1")
    assert first is not None and len(first) == 32 and key_of("pi2") == first
    assert first == store.read_catalog_key(store.catalog_key_path(d))
    assert key_of("asker", "asker") is None and key_of("coordinator", "coordinator") is None
    # a gateway-issued node: its copied files carry the key (no CA key on the Pi)
    pi = tmp_path / "pi2-home"
    pi.mkdir(mode=0o700)
    for f in ("ca.crt", "pi2.crt", "pi2.key", "pi2.catalog-key"):
        (pi / f).write_bytes((d / f).read_bytes())
    assert key_of("pi2", directory=pi) == first
    # revoking a holder (a stolen Pi knows the key): a new key for every other node, none for it
    store.revoke(d, "pi1")
    assert store.catalog_key_holders(d) == ["pi2"]
    second = key_of("pi2")
    assert second is not None and second != first and second == store.read_catalog_key(store.catalog_key_path(d))
    assert key_of("pi2", directory=pi) == first  # until the operator copies the new one there
    store.revoke(d, "asker")  # it never held the key: nothing to rotate
    assert key_of("pi2") == second
    # one box (the CA key here, mesh up): an identity without the key, or with an old one, gets the
    # current one when its process starts; a revoked one gets none
    store.catalog_key_path(d, "pi2").write_bytes((pi / "pi2.catalog-key").read_bytes())
    assert store.load_keyring(d, "pi2").catalog_key == second  # type: ignore[union-attr]
    store.catalog_key_path(d, "pi2").unlink()
    assert store.load_keyring(d, "pi2").catalog_key == second  # type: ignore[union-attr]
    assert store.load_keyring(d, "pi1").catalog_key is None  # type: ignore[union-attr]
    assert store.catalog_key_holders(d) == ["pi2"]
    # a damaged copy is refused, never used as a key
    (pi / "pi2.catalog-key").write_bytes(b"-----BEGIN MESH CATALOG KEY-----\nAAAA\n-----END MESH CATALOG KEY-----\n")
    with pytest.raises(ConfigError):
        store.load_keyring(pi, "pi2")
