"""The `ebpflb` command: kubectl-like verbs against the registry, and the daemons themselves."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from ebpflb import printers
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import (
    DEFAULT_ADDRESS,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
    TlsConfig,
    TlsError,
)
from ebpflb.objects import (
    DEFAULT_NAMESPACE,
    SERVICE_NAME_LABEL,
    Key,
    Kind,
    ManifestError,
    from_manifest,
    key_of,
    kind_named,
    kind_of,
    load_documents,
    message_of,
    one_line,
)

REGISTRY_ENV = "EBPFLB_REGISTRY"
# The registry's limits (ebpflb.registry.server.Limits has the same defaults; a unit
# test checks). Spelled out here so `ebpflb get` need not import the server.
REGISTRY_LIMITS = {
    "max_message_bytes": (16 * 1024 * 1024, "the largest request accepted, in bytes"),
    "max_apply_objects": (50_000, "objects in one Apply"),
    "max_objects": (1_000_000, "objects stored, EndpointSlices included"),
    "max_watches": (256, "watch streams open at once"),
}
# ebpflb.certs.ROLES and its validity defaults, for the same reason (cryptography
# takes a third of a second to import).
CERT_ROLES = ("admin", "node", "viewer", "server")
CA_DAYS, CERT_DAYS = 3650, 365
# A client's TLS files (flag, then environment): the CA that signed the registry's
# certificate, and this client's certificate and key.
TLS_ENV = {"tls_ca": "EBPFLB_TLS_CA", "tls_cert": "EBPFLB_TLS_CERT", "tls_key": "EBPFLB_TLS_KEY"}
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# `get endpoints` is kubectl's Endpoints view, built from EndpointSlices.
ENDPOINTS_WORDS = ("endpoints", "ep")
GET_KINDS = "services, pods, endpoints, endpointslices, nodes"
# PyYAML's mark: `in "<unicode string>", line 1, column 5:` (the source line follows).


class CliError(Exception):
    """A user error: main prints `error: <message>` and exits 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    """One subcommand: its flags and what it does (returns the exit code)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------ helpers


def _address(args: argparse.Namespace) -> str:
    """The registry address, or several separated by commas (tried in turn)."""
    given: str = args.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_ADDRESS
    return ",".join("unix://" + a if a.startswith("/") else a for a in given.split(","))


def _unix_only(address: str) -> bool:
    return all(a.startswith("unix:") for a in address.split(","))


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The client's TLS files from --tls-ca/--tls-cert/--tls-key or EBPFLB_TLS_*; None
    when none is given. A unix socket never uses them."""
    ca, cert, key = (getattr(args, a, None) or os.environ.get(e, "") for a, e in TLS_ENV.items())
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise CliError("--tls-cert and --tls-key go together (or EBPFLB_TLS_CERT and _KEY)")
    if not ca:
        raise CliError("--tls-ca is needed too: the CA that signed the registry's certificate")
    return TlsConfig(ca=ca, cert=cert, key=key)


def _client(args: argparse.Namespace) -> RegistryClient:
    address = _address(args)
    tls = None if _unix_only(address) else tls_config(args)
    try:
        return RegistryClient(address, tls=tls)
    except TlsError as e:
        raise CliError(str(e)) from None


def _kind(word: str) -> Kind:
    try:
        return kind_named(word)
    except ManifestError:
        raise CliError(f'the server doesn\'t have a resource type "{word}"') from None


def _namespace(args: argparse.Namespace) -> str:
    ns: str = args.namespace or DEFAULT_NAMESPACE
    return ns


def _warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def _server_error(e: RegistryError) -> str:
    """kubectl's line for an error the registry answered with."""
    if isinstance(e, RegistryUnavailable):
        return f"error: {e.details}"
    return f"Error from server ({e.reason}): {e.details}"


def _manifest_files(path: str) -> Iterator[Path | None]:
    """The files -f PATH means (None for stdin): a file, or a folder's manifests in name order."""
    if path == "-":
        yield None
        return
    p = Path(path)
    if p.is_dir():
        yield from sorted(f for f in p.iterdir() if f.is_file() and f.suffix in MANIFEST_SUFFIXES)
    elif p.exists():
        yield p
    else:
        raise CliError(f'the path "{path}" does not exist')


def _read(file: Path | None) -> tuple[str, str]:
    """(label for messages, text) of a manifest file, or of stdin for None."""
    if file is None:
        return "STDIN", sys.stdin.read()
    try:
        return str(file), file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{file}: not UTF-8 text") from None
    except OSError as e:
        raise CliError(f"{file}: {e.strerror}") from None


def read_manifests(
    paths: Sequence[str], namespace: str | None, *, warn: bool = True
) -> list[tuple[str, pb.Object]]:
    """Every object in the -f paths, with the file it came from; unknown-field
    warnings go to stderr (with warn); any bad document is a CliError."""
    out: list[tuple[str, pb.Object]] = []
    for path in paths:
        for file in _manifest_files(path):
            label, text = _read(file)
            try:
                docs = load_documents(text)
            except ManifestError as e:
                raise CliError(f"{label}: {one_line(str(e))}") from None
            for i, doc in enumerate(docs):
                warnings: list[str] = []
                try:
                    obj = from_manifest(doc, warnings)
                except ManifestError as e:
                    where = f"document {i + 1}: " if len(docs) > 1 else ""
                    raise CliError(f"{label}: {where}{one_line(str(e))}") from None
                for w in warnings if warn else ():
                    _warn(w)
                if namespace:
                    _set_namespace(obj, namespace)
                out.append((label, obj))
    return out


def _set_namespace(obj: pb.Object, namespace: str) -> None:
    if not kind_of(obj).namespaced:
        return
    meta = message_of(obj).metadata
    if not meta.namespace:
        meta.namespace = namespace
    elif meta.namespace != namespace:
        raise CliError(
            f'the namespace from the provided object "{meta.namespace}" does not match the '
            f"namespace \"{namespace}\". You must pass '--namespace={meta.namespace}' to "
            "perform this operation."
        )


def _sorted(objects: Sequence[pb.Object]) -> list[pb.Object]:
    return sorted(objects, key=key_of)


# ------------------------------------------------------------------ apply


def _apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="a manifest file, a folder (its *.yaml, *.yml, *.json) or - (stdin); repeatable",
    )
    p.add_argument("-n", "--namespace", help="namespace for objects that name none")
    p.add_argument(
        "--dry-run",
        nargs="?",
        const="server",
        default="none",
        choices=("none", "server"),
        help="have the registry validate and allocate, but store nothing",
    )


def cmd_apply(args: argparse.Namespace) -> int:
    """Parse every document first, then apply them all in one atomic call."""
    objects = [obj for _, obj in read_manifests(args.filename, args.namespace)]
    if not objects:
        raise CliError("no objects passed to apply")
    dry_run = args.dry_run == "server"
    with _client(args) as client:
        resp = client.apply(objects, dry_run=dry_run)
    suffix = " (server dry run)" if dry_run else ""
    stored = resp.objects if len(resp.objects) == len(objects) else objects
    for obj, result in zip(stored, resp.results, strict=False):
        print(f"{printers.object_ref(obj)} {result}{suffix}")
    return 0


# ------------------------------------------------------------------ delete


def _delete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", metavar="KIND", help=f"one of: {GET_KINDS}")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        metavar="FILE",
        help="delete the objects in this file, folder or - (stdin); repeatable",
    )
    p.add_argument("-n", "--namespace", help="the objects' namespace (default: default)")
    p.add_argument(
        "--grace-period",
        type=int,
        metavar="SECONDS",
        help="Pods: seconds to stay terminating (default: the Pod's own)",
    )
    p.add_argument(
        "--ignore-not-found", action="store_true", help="a missing object is not an error"
    )


def cmd_delete(args: argparse.Namespace) -> int:
    if args.filename:
        if args.kind:
            raise CliError("give either -f or KIND NAME..., not both")
        targets = [
            (f'error when deleting "{label}": ', key_of(obj), kind_of(obj))
            for label, obj in read_manifests(args.filename, args.namespace, warn=False)
        ]
    else:
        if not args.kind or not args.names:
            raise CliError("give -f FILE or KIND NAME... to delete")
        kind = _kind(args.kind)
        ns = _namespace(args) if kind.namespaced else ""
        targets = [("", Key(kind.name, ns, name), kind) for name in args.names]
    failed = False
    with _client(args) as client:
        for context, key, kind in targets:
            try:
                client.delete(key, grace_period_seconds=args.grace_period)
            except RegistryError as e:
                if isinstance(e, RegistryUnavailable):
                    raise
                if e.not_found and args.ignore_not_found:
                    continue
                details = printers.not_found(kind, key.name) if e.not_found else e.details
                print(f"Error from server ({e.reason}): {context}{details}", file=sys.stderr)
                failed = True
                continue
            print(printers.deleted_line(kind, key.name))
    return 1 if failed else 0


# ------------------------------------------------------------------ get


def _get_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", metavar="KIND", help=f"one of: {GET_KINDS}")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument(
        "-o",
        "--output",
        choices=("wide", "yaml", "json", "name"),
        help="wide: more columns; yaml, json: the objects; name: kind/name",
    )
    p.add_argument("-l", "--selector", default="", help="label selector, e.g. app=web,tier!=db")
    p.add_argument("-n", "--namespace", help="namespace (default: default)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")


def _get_named(
    client: RegistryClient, kind: str, ns: str, names: Sequence[str], missing: list[str]
) -> list[pb.Object]:
    """The named objects that exist; the names of those that do not go into missing."""
    found = []
    for name in names:
        try:
            found.append(client.get(Key(kind, ns, name)))
        except RegistryError as e:
            if not e.not_found:
                raise
            missing.append(name)
    return found


def cmd_get(args: argparse.Namespace) -> int:
    if not args.kind:
        raise CliError(f"you must specify the type of resource to get: {GET_KINDS}")
    if args.names and args.all_namespaces:
        raise CliError("a resource cannot be retrieved by name across all namespaces")
    if args.names and args.selector:
        raise CliError("name cannot be provided when a selector is specified")
    if args.kind.lower() in ENDPOINTS_WORDS:
        return _get_endpoints(args)
    kind = _kind(args.kind)
    ns = "" if args.all_namespaces or not kind.namespaced else _namespace(args)
    missing: list[str] = []
    with _client(args) as client:
        if args.names:
            objects = _get_named(client, kind.name, ns, args.names, missing)
        else:
            objects = _sorted(client.list(kind.name, ns, args.selector).items)
    _print_objects(args, kind, objects)
    for name in missing:
        print(f"Error from server (NotFound): {printers.not_found(kind, name)}", file=sys.stderr)
    return 1 if missing else 0


def _print_objects(args: argparse.Namespace, kind: Kind, objects: list[pb.Object]) -> None:
    single = len(args.names) == 1
    if args.output == "yaml":
        if objects or not single:
            sys.stdout.write(printers.to_yaml(objects, single=single))
        return
    if args.output == "json":
        if objects or not single:
            sys.stdout.write(printers.to_json(objects, single=single))
        return
    if not objects:
        if not args.names:
            _no_resources(args, kind.namespaced)
        return
    if args.output == "name":
        for obj in objects:
            print(printers.object_ref(obj))
        return
    now = datetime.now(UTC)
    sys.stdout.write(
        printers.get_table(
            kind, objects, now, wide=args.output == "wide", with_namespace=args.all_namespaces
        )
    )


def _no_resources(args: argparse.Namespace, namespaced: bool) -> None:
    if namespaced and not args.all_namespaces:
        print(f"No resources found in {_namespace(args)} namespace.", file=sys.stderr)
    else:
        print("No resources found", file=sys.stderr)


def _get_endpoints(args: argparse.Namespace) -> int:
    """kubectl's `get endpoints`: one row per Service, from its EndpointSlices."""
    ns = "" if args.all_namespaces else _namespace(args)
    missing = []
    with _client(args) as client:
        if args.names:
            found: list[printers.ServiceEndpoints] = []
            for name in args.names:
                services = []
                try:
                    services.append(client.get(Key("Service", ns, name)).service)
                except RegistryError as e:
                    if not e.not_found:
                        raise
                selector = f"{SERVICE_NAME_LABEL}={name}"
                slices = [
                    o.endpoint_slice for o in client.list("EndpointSlice", ns, selector).items
                ]
                rows = printers.service_endpoints(services, slices)
                found += rows
                if not rows:
                    missing.append(name)
        else:
            services = [o.service for o in client.list("Service", ns, args.selector).items]
            slices = [o.endpoint_slice for o in client.list("EndpointSlice", ns).items]
            # Endpoints carry their Service's labels: with -l, only the selected Services.
            found = printers.service_endpoints(services, slices, orphans=not args.selector)
    if args.output in ("yaml", "json"):
        # There is no Endpoints kind: show the EndpointSlices the rows are made of.
        objects = _sorted([pb.Object(endpoint_slice=s) for ep in found for s in ep.slices])
        render = printers.to_yaml if args.output == "yaml" else printers.to_json
        sys.stdout.write(render(objects, single=False))
    elif not found:
        if not args.names:
            _no_resources(args, True)
    elif args.output == "name":
        for ep in found:
            print(f"endpoints/{ep.name}")
    else:
        now = datetime.now(UTC)
        table = printers.endpoints_table(found, now, with_namespace=args.all_namespaces)
        sys.stdout.write(table)
    for name in missing:
        print(f'Error from server (NotFound): endpoints "{name}" not found', file=sys.stderr)
    return 1 if missing else 0


# ------------------------------------------------------------------ describe


def _describe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", metavar="KIND", help="services (the one kind described so far)")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every one in the namespace")
    p.add_argument("-n", "--namespace", help="namespace (default: default)")


def cmd_describe(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    if kind.name != "Service":
        raise CliError(f"describe supports services only, not {printers.resource_plural(kind)}")
    ns = _namespace(args)
    missing: list[str] = []
    texts = []
    with _client(args) as client:
        if args.names:
            services = _get_named(client, kind.name, ns, args.names, missing)
        else:
            services = _sorted(client.list(kind.name, ns).items)
        for obj in services:
            svc = obj.service
            selector = f"{SERVICE_NAME_LABEL}={svc.metadata.name}"
            slices = [o.endpoint_slice for o in client.list("EndpointSlice", ns, selector).items]
            texts.append(printers.describe_service(svc, slices))
    if texts:
        sys.stdout.write("\n\n".join(texts))
    elif not args.names:
        _no_resources(args, True)
    for name in missing:
        print(f"Error from server (NotFound): {printers.not_found(kind, name)}", file=sys.stderr)
    return 1 if missing else 0


# ------------------------------------------------------------------ registry


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"unix:///path (plain, mode 0600, callers are admin) or host:port (mTLS); "
        f"repeatable (default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--store",
        default="sqlite:///var/lib/ebpflb/registry.db",
        metavar="URL",
        help="where objects are kept: sqlite:///path/to/file.db, or "
        "etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (an etcd cluster several registries share)",
    )
    p.add_argument(
        "--service-cidr", default="10.96.0.0/12", metavar="CIDR", help="where ClusterIPs come from"
    )
    p.add_argument(
        "--node-port-range", default="30000-32767", metavar="A-B", help="where nodePorts come from"
    )
    # --tls-cert and --tls-key are the global flags: here, the registry's own.
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="with --tls-cert and --tls-key: the CA that signs clients' certificates "
        "(default --tls-ca; a TCP listener requires all three; the registry reads "
        "flags only, never EBPFLB_TLS_*)",
    )
    p.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="allow a TCP listener without TLS: unauthenticated, every caller is admin "
        "(a private test network only)",
    )
    for dest, (default, what) in REGISTRY_LIMITS.items():
        p.add_argument(
            "--" + dest.replace("_", "-"),
            type=_positive,
            default=default,
            metavar="N",
            help=f"{what} (default {default})",
        )


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f'invalid value "{text}": want a positive integer')
    return n


def node_port_range(text: str) -> tuple[int, int]:
    """`30000-32767` as (30000, 32767)."""
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low = high = 0
    if not sep or not 1 <= low <= high <= 65535:
        raise CliError(f'--node-port-range: invalid value "{text}": want A-B, 1 <= A <= B <= 65535')
    return low, high


def cmd_registry(args: argparse.Namespace) -> int:
    """Run the registry until SIGINT or SIGTERM."""
    try:
        ipaddress.ip_network(args.service_cidr)
    except ValueError as e:
        raise CliError(f"--service-cidr: {e}") from None
    node_port_range(args.node_port_range)
    from ebpflb.registry.server import Limits, ServerTls, run
    from ebpflb.registry.store import StoreError

    files = {
        "--tls-cert": args.tls_cert,
        "--tls-key": args.tls_key,
        "--tls-client-ca": args.tls_client_ca or args.tls_ca,
    }
    missing = [flag for flag, value in files.items() if not value]
    if len(missing) < len(files) and missing:
        raise CliError(
            f"{', '.join(missing)} missing: mTLS needs --tls-cert, --tls-key and --tls-client-ca"
        )
    tls = ServerTls(*files.values()) if not missing else None
    limits = Limits(**{dest: getattr(args, dest) for dest in REGISTRY_LIMITS})
    try:
        run(
            listen=args.listen or [DEFAULT_ADDRESS],
            store_url=args.store,
            service_cidr=args.service_cidr,
            node_port_range=args.node_port_range,
            tls=tls,
            insecure_tcp=args.insecure_tcp,
            limits=limits,
        )
    except (ValueError, OSError, StoreError) as e:
        # A store URL it cannot open, an address it cannot listen on, TCP without TLS.
        raise CliError(str(e)) from None
    return 0


# ------------------------------------------------------------------ agent and demo


def _agent_arguments(p: argparse.ArgumentParser) -> None:
    from ebpflb.datapath.loader import TC_ATTACH_MODES, DatapathConfig

    p.add_argument("--node", required=True, help="this node's name (its Node object)")
    p.add_argument("--bridge", default="cni0", help="the pods' bridge (default cni0)")
    p.add_argument("--node-ip", default="", metavar="IP", help="default: autodetected")
    p.add_argument("--pod-cidr", default="", metavar="CIDR", help="default: the bridge's subnet")
    p.add_argument(
        "--external-iface",
        action="append",
        default=[],
        metavar="IFACE[:MODE]",
        help="where NodePort traffic comes in (repeatable; MODE xdp, xdp-generic or tc; "
        "default: every interface that is not the bridge, a pod veth or lo, "
        "in the faster mode for its kind)",
    )
    p.add_argument("--pin-dir", default="", metavar="DIR", help="default /sys/fs/bpf/ebpflb/<node>")
    p.add_argument(
        "--max-conntrack",
        type=_positive,
        default=DatapathConfig.max_conntrack,
        metavar="N",
        help="conntrack entries (a flow takes two; default %(default)s); a changed size is "
        "migrated at start, flows kept (bpf/README.md: sizing)",
    )
    p.add_argument(
        "--socket-lb-cgroup",
        default="",
        metavar="DIR",
        help="socket-level load balancing for the processes of this cgroup v2 directory and "
        "its descendants (e.g. the node's pods): a Service is translated to a backend at "
        "connect() and sendto(), not per packet (bpf/README.md: socket-level)",
    )
    p.add_argument(
        "--tc-attach",
        choices=TC_ATTACH_MODES,
        default="auto",
        help="how the programs go on the interfaces' tc hooks: tcx (Linux 6.6+, no qdisc) or "
        "a filter under a clsact qdisc (what `tc filter show` lists); auto: tcx where the "
        "kernel has it (default)",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="on exit, detach the programs and remove the pinned maps "
        "(without it the datapath keeps working while the agent is down)",
    )


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the node agent until SIGINT or SIGTERM."""
    from ebpflb.agent.agent import AgentConfig, run

    address = _address(args)
    tls = None if _unix_only(address) else tls_config(args)
    if tls is not None:
        try:
            tls.credentials()  # unreadable files: an error now, not a retry loop
        except TlsError as e:
            raise CliError(str(e)) from None
    run(
        AgentConfig(
            registry=address,
            node=args.node,
            bridge=args.bridge,
            pin_dir=args.pin_dir,
            node_ip=args.node_ip,
            pod_cidr=args.pod_cidr,
            external_ifaces=tuple(args.external_iface),
            cleanup=args.cleanup,
            tls=tls,
            max_conntrack=args.max_conntrack,
            socket_lb_cgroup=args.socket_lb_cgroup,
            tc_attach=args.tc_attach,
        )
    )
    return 0


def _maps_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", help="the node whose agent pins under /sys/fs/bpf/ebpflb/NODE")
    where.add_argument("--pin-dir", metavar="DIR", help="the folder the maps are pinned in")


def cmd_maps(args: argparse.Namespace) -> int:
    """What the datapath holds, read from the pinned maps (no registry needed)."""
    from ebpflb.agent.agent import DEFAULT_PIN_ROOT
    from ebpflb.datapath import conntrack
    from ebpflb.datapath.maps import LbMaps
    from ebpflb.datapath.programmer import Programmer

    pin_dir = args.pin_dir or f"{DEFAULT_PIN_ROOT}/{args.node}"
    try:
        maps = LbMaps.open(pin_dir)
    except OSError as e:
        raise CliError(f"{pin_dir}: no ebpflb maps pinned there ({e.strerror or e})") from None
    try:
        rows = []
        for f in Programmer(maps).dump():
            backends = ",".join(f"{b.ip}:{b.port}" for b in f.backends) or "<none>"
            affinity = f"{f.affinity_timeout}s" if f.affinity_timeout else "-"
            rows.append([f"{f.vip}:{f.port}/{f.protocol}", affinity, backends])
        print(printers.table(["FRONTEND", "AFFINITY", "BACKENDS"], rows), end="")
        print()
        counters = maps.counter_totals()
        print("   ".join(f"{k}={v}" for k, v in counters.items()))
        print(conntrack.fill(maps))
    finally:
        maps.close()
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from ebpflb.bench import arguments  # light: argparse and the mode names only

    arguments(p)


def cmd_bench(args: argparse.Namespace) -> int:
    """ebpflb against no load balancer and kube-proxy's iptables/nftables modes (root)."""
    from ebpflb.bench import run as run_bench

    return int(run_bench(args))


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    p.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    p.add_argument(
        "--nodeport-mode",
        choices=("xdp", "xdp-generic", "tc"),
        default="",
        help="NodePort path on the nodes' external interfaces (default: the faster one "
        "for a veth, tc)",
    )
    p.add_argument(
        "--cleanup", metavar="PREFIX", help="remove a cluster an earlier `demo --keep` left"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a namespace cluster, balance nginx pods behind a ClusterIP, show it."""
    from ebpflb import demo

    if args.cleanup:
        return demo.cleanup(args.cleanup)
    if not 1 <= args.nodes <= 16:
        raise CliError("--nodes: from 1 to 16")
    return demo.run(keep=args.keep, nodes=args.nodes, nodeport_mode=args.nodeport_mode)


# ------------------------------------------------------------------ certs

DEFAULT_CERTS_DIR = "/etc/ebpflb/pki"


def _certs_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init", help="make a CA: DIR/ca.crt and DIR/ca.key", description="make a CA"
    )
    issue = sub.add_parser(
        "issue",
        help="issue DIR/NAME.crt and DIR/NAME.key, signed by the CA in DIR",
        description="Issue a certificate signed by the CA in DIR. Clients get O=ebpflb, "
        "OU=ROLE, CN=NAME (a node: CN=system:node:NODE); the registry's (role server) "
        "names the addresses clients dial (--ip, --dns).",
    )
    show = sub.add_parser("show", help="what certificate files say", description="show certs")
    for q in (init, issue):
        q.add_argument(
            "--dir", default=DEFAULT_CERTS_DIR, help=f"default {DEFAULT_CERTS_DIR} (made 0700)"
        )
        q.add_argument("--force", action="store_true", help="replace files that exist")
    init.add_argument(
        "--days", type=_positive, default=CA_DAYS, help=f"validity (default {CA_DAYS})"
    )
    issue.add_argument("--name", required=True, help="the files' name, and a client's CN")
    issue.add_argument(
        "--role",
        required=True,
        choices=CERT_ROLES,
        help="admin, node, viewer: a client's (the OU); server: the registry's own",
    )
    issue.add_argument("--node", default="", help="role node: its Node's name (default NAME)")
    issue.add_argument(
        "--ip", action="append", default=[], metavar="IP", help="an IP SAN (repeatable)"
    )
    issue.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="a DNS SAN (repeatable)"
    )
    issue.add_argument(
        "--days", type=_positive, default=CERT_DAYS, help=f"validity (default {CERT_DAYS})"
    )
    show.add_argument("files", nargs="+", metavar="FILE")


def cmd_certs(args: argparse.Namespace) -> int:
    """A CA and certificates for the registry's mTLS (ECDSA P-256; keys mode 0600)."""
    from ebpflb import certs

    try:
        if args.certs_command == "init":
            issued = certs.init_ca(Path(args.dir), days=args.days, force=args.force)
        elif args.certs_command == "issue":
            issued = certs.issue(
                Path(args.dir),
                args.name,
                args.role,
                node=args.node,
                ips=args.ip,
                dns=args.dns,
                days=args.days,
                force=args.force,
            )
        else:
            for f in args.files:
                print(certs.describe(Path(f)))
            return 0
        print(certs.describe(issued.cert))
        print(f"{issued.key}: its key (mode 0600)")
    except certs.CertError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"{e.filename}: {e.strerror}") from None
    return 0


# ------------------------------------------------------------------ main

COMMANDS: tuple[Command, ...] = (
    Command("apply", "create or update objects from manifests", _apply_arguments, cmd_apply),
    Command("delete", "delete objects by file or by kind and name", _delete_arguments, cmd_delete),
    Command("get", "list objects as a table, YAML, JSON or names", _get_arguments, cmd_get),
    Command("describe", "show a Service in detail", _describe_arguments, cmd_describe),
    Command("registry", "run the registry (gRPC server)", _registry_arguments, cmd_registry),
    Command(
        "agent", "run the node agent (in the node's network namespace)", _agent_arguments, cmd_agent
    ),
    Command(
        "maps", "show the frontends and counters in a node's pinned maps", _maps_arguments, cmd_maps
    ),
    Command(
        "bench",
        "benchmark against direct, iptables and nftables (root)",
        _bench_arguments,
        cmd_bench,
    ),
    Command("demo", "a namespace cluster with nginx behind a ClusterIP", _demo_arguments, cmd_demo),
    Command("certs", "a CA and certificates for the registry's mTLS", _certs_arguments, cmd_certs),
)


def parser() -> argparse.ArgumentParser:
    registry_help = "registry address: unix:///path or host:port, or several separated by "
    registry_help += f"commas, tried in turn (env {REGISTRY_ENV}; "
    registry_help += f"default {DEFAULT_ADDRESS})"
    # --registry is accepted before or after the subcommand, as kubectl's global flags are.
    common = _Parser(add_help=False)
    common.add_argument("--registry", metavar="ADDR", default=argparse.SUPPRESS, help=registry_help)
    top = _Parser(prog="ebpflb", description="Kubernetes Services with an eBPF datapath.")
    top.add_argument("--registry", metavar="ADDR", default=None, help=registry_help)
    tls_help = {
        "tls_ca": "the CA that signed the registry's certificate",
        "tls_cert": "this client's certificate (for `registry`: the registry's own)",
        "tls_key": "its private key",
    }
    for dest, env in TLS_ENV.items():
        flag = "--" + dest.replace("_", "-")
        what = f"{tls_help[dest]}, PEM (env {env}; used for host:port registries)"
        common.add_argument(flag, metavar="FILE", default=argparse.SUPPRESS, help=what)
        top.add_argument(flag, metavar="FILE", default=None, help=what)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help, parents=[common])
        c.arguments(p)
        p.set_defaults(run=c.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    try:
        args, extra = top.parse_known_args(argv)
        if extra:
            where = f"ebpflb {args.command}" if args.command else "ebpflb"
            raise CliError(f"unrecognized arguments: {' '.join(extra)} (see '{where} --help')")
        if args.command is None:
            top.print_help()
            return 0
        code: int = args.run(args)
        sys.stdout.flush()
        return code
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
    except RegistryError as e:
        print(_server_error(e), file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ebpflb get pods | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
