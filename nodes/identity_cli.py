"""`mesh identity`: the mesh's certificate authority at the command line (``mesh.auth.store``).

    mesh identity init                         make the CA (kept if present)
    mesh identity issue NAME... [--role R]     an identity per name (kept unless --renew)
    mesh identity revoke NAME...               add their certificates to the signed crl.pem (and
                                               rotate the catalog key if one of them held it)
    mesh identity rotate                       a new catalog key for every node identity here
    mesh identity show [NAME...]               the CA, the CRL and identities as JSON

The directory is ``--dir``, else ``<MESH_HOME>/identity``. On the gateway, ``make-users.sh`` runs it
with ``--dir /etc/mesh/mosquitto/identity`` for every broker account; copy ``ca.crt``, ``crl.pem``
and a node's ``NAME.crt``, ``NAME.key`` and ``NAME.catalog-key`` to that node's identity directory
(mode 0600, directory 0700). Only node identities get a ``NAME.catalog-key`` (the key of cache
catalogs, ``mesh.cache.catalog``); after a revocation that rotated it, copy the new one (listed
as ``recopy``) to every node with the new ``crl.pem``. It also runs without the rest of the CLI:
``python -m nodes.identity_cli`` (no torch import).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mesh.errors import MeshError


def _dir(args: argparse.Namespace) -> Path:
    from mesh.auth.store import identity_dir
    from nodes.settings import mesh_home

    return Path(args.dir) if args.dir else identity_dir(mesh_home(args))


def _kid(path: Path) -> str | None:
    """The public id of the catalog key in ``path`` (``mesh.cache.catalog.key_id``), None if absent."""
    from mesh.auth.store import read_catalog_key
    from mesh.cache.catalog import key_id

    secret = read_catalog_key(path)
    return None if secret is None else key_id(secret).hex()


def cmd_identity(args: argparse.Namespace) -> int:
    from cryptography import x509

    from mesh.auth import store
    from mesh.auth.certs import crl_number

    d = _dir(args)
    if args.action == "init":
        ca = store.init_ca(d)
        print(json.dumps({"dir": str(d), "ca": ca.cert.subject.rfc4514_string(),
                          "not_after": ca.cert.not_valid_after_utc.isoformat()}))
    elif args.action == "issue":
        for name in args.names:
            ident = store.issue(d, name, args.role, days=args.days, renew=args.renew)
            print(json.dumps({"name": ident.name, "role": ident.role, "serial": f"{ident.serial:x}",
                              "cert": str(d / f"{name}.crt"), "key": str(d / f"{name}.key")}))
    elif args.action == "revoke":
        for name in args.names:
            held = store.catalog_key_path(d, name).exists()
            crl = store.revoke(d, name)
            out = {"revoked": name, "crl": str(d / "crl.pem"), "number": crl_number(crl),
                   "catalog_key_rotated": held}
            if held:  # a stolen Pi knows the catalog key: the others need the new one
                out["recopy"] = [str(store.catalog_key_path(d, n)) for n in store.catalog_key_holders(d)]
            print(json.dumps(out))
    elif args.action == "rotate":
        rekeyed = store.rotate_catalog_key(d)
        print(json.dumps({"catalog_key": _kid(store.catalog_key_path(d)),
                          "recopy": [str(store.catalog_key_path(d, n)) for n in rekeyed]}))
    else:
        ca = store.load_ca_cert(d)
        crl = store.load_crl(d, ca)
        out: dict[str, Any] = {"dir": str(d), "ca_key_here": store.has_ca_key(d),
                               "catalog_key": _kid(store.catalog_key_path(d)),
                               "crl": None if crl is None else {"number": crl_number(crl), "revoked": sorted(
                                   f"{r.serial_number:x}" for r in crl)}, "identities": []}
        names = args.names or sorted(p.stem for p in d.glob("*.crt") if p.name != "ca.crt")
        for name in names:
            cert = x509.load_pem_x509_certificate((d / f"{name}.crt").read_bytes())
            revoked = crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
            out["identities"].append({"name": name, "subject": cert.subject.rfc4514_string(),
                                      "serial": f"{cert.serial_number:x}", "revoked": revoked,
                                      "not_after": cert.not_valid_after_utc.isoformat(),
                                      "key_here": (d / f"{name}.key").exists(),
                                      "catalog_key": _kid(store.catalog_key_path(d, name))})
        print(json.dumps(out, indent=2))
    return 0


def add_identity_command(sub: Any) -> None:
    from mesh.auth.certs import DEFAULT_DAYS, ROLES

    p = sub.add_parser("identity", help="the mesh's own CA: identities and revocations (mesh.auth)")
    actions = p.add_subparsers(dest="action", required=True)
    for action, help_text in (("init", "make the CA (kept if present)"),
                              ("issue", "an identity per name (kept unless --renew)"),
                              ("revoke", "add the names' certificates to the signed crl.pem (a node's: "
                                         "and rotate the catalog key)"),
                              ("rotate", "a new catalog key for every node identity here"),
                              ("show", "the CA, the CRL and identities as JSON")):
        a = actions.add_parser(action, help=help_text)
        if action not in ("init", "rotate"):
            a.add_argument("names", nargs="+" if action in ("issue", "revoke") else "*",
                           help="principal names (broker usernames)")
        if action == "issue":
            a.add_argument("--role", choices=ROLES, default="node", help="the role (default node)")
            a.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
            a.add_argument("--renew", action="store_true", help="a new identity even if one exists")
        a.add_argument("--dir", help="identity directory (default <MESH_HOME>/identity)")
        a.add_argument("--home", help="MESH_HOME (default ~/.cache/mesh)")
        a.set_defaults(func=cmd_identity, **({"names": []} if action in ("init", "rotate") else {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_identity_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return cmd_identity(args)
    except MeshError as exc:
        print(f"mesh identity: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(["identity", *sys.argv[1:]]))
