"""The CLI's own logic without a registry: reading manifests, flags, one-line errors."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from ebpflb import cli
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import key_of

pytestmark = pytest.mark.unit

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  ports:
  - port: 80
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def names(objs: list[tuple[str, pb.Object]]) -> list[str]:
    return [str(key_of(o)) for _, o in objs]


def test_a_folder_means_its_manifests_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "b.yml", SERVICE.format(name="b"))
    write(tmp_path / "a.yaml", SERVICE.format(name="a") + "---\n" + SERVICE.format(name="a2"))
    write(tmp_path / "c.json", '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}}')
    write(tmp_path / "notes.txt", "not a manifest")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "d.yaml", SERVICE.format(name="d"))
    objs = cli.read_manifests([str(tmp_path)], None)
    assert names(objs) == [
        "Service/default/a",
        "Service/default/a2",
        "Service/default/b",
        "Service/default/c",
    ]
    assert [label for label, _ in objs][0] == str(tmp_path / "a.yaml")


def test_list_and_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n" + textwrap.indent(
        "- " + SERVICE.format(name="x").replace("\n", "\n  "), ""
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    objs = cli.read_manifests(["-"], None)
    assert names(objs) == ["Service/default/x"]
    assert objs[0][0] == "STDIN"


def test_unknown_fields_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "s.yaml", SERVICE.format(name="s") + "  foo: 1\n")
    cli.read_manifests([str(f)], None)
    assert capsys.readouterr().err == 'Warning: unknown field "spec.foo"\n'
    cli.read_manifests([str(f)], None, warn=False)
    assert capsys.readouterr().err == ""


def test_namespace_flag_fills_in_and_must_agree(tmp_path: Path) -> None:
    f = write(tmp_path / "s.yaml", SERVICE.format(name="s"))
    assert names(cli.read_manifests([str(f)], "prod")) == ["Service/prod/s"]
    g = write(
        tmp_path / "t.yaml",
        SERVICE.format(name="t").replace("  name: t", "  name: t\n  namespace: dev"),
    )
    with pytest.raises(
        cli.CliError, match='namespace from the provided object "dev" does not match'
    ):
        cli.read_manifests([str(g)], "prod")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            SERVICE.format(name="a") + "---\nkind: Service\n",
            '{f}: document 2: apiVersion: Invalid value: "None": Service is v1',
        ),
        ("apiVersion: v1\nkind: Gadget\n", "{f}: kind: Unsupported value:"),
        (
            "a: [",
            "{f}: not valid YAML or JSON: while parsing a flow node expected the node content, "
            "but found '<stream end>' at line 1, column 5",
        ),
        ("[1, 2]", "{f}: a manifest must be a mapping, not int"),
    ],
)
def test_manifest_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(cli.CliError) as e:
        cli.read_manifests([str(f)], None)
    assert str(e.value).startswith(message.format(f=f))
    assert "\n" not in str(e.value)


def test_missing_path() -> None:
    with pytest.raises(cli.CliError, match='the path "/nonexistent.yaml" does not exist'):
        cli.read_manifests(["/nonexistent.yaml"], None)


def test_one_line() -> None:
    assert cli.one_line("a\n  b\n") == "a b"
    yaml_error = (
        "mapping values are not allowed here\n"
        '  in "<unicode string>", line 2, column 4:\n'
        "      c: d\n"
        "       ^"
    )
    assert cli.one_line(yaml_error) == "mapping values are not allowed here at line 2, column 4"


def test_node_port_range() -> None:
    assert cli.node_port_range("30000-32767") == (30000, 32767)
    for bad in ("30000", "b-a", "0-10", "20-10", "1-70000"):
        with pytest.raises(cli.CliError, match="--node-port-range"):
            cli.node_port_range(bad)


# Usage errors: one line on stderr, exit 1, and no registry is contacted.
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["get"],
            "error: you must specify the type of resource to get: services, pods, endpoints, "
            "endpointslices, nodes",
        ),
        (
            ["get", "svc", "--bogus"],
            "error: unrecognized arguments: --bogus (see 'ebpflb get --help')",
        ),
        (["get", "svc", "-o", "table"], "error: argument -o/--output: invalid choice: 'table'"),
        (["get", "gadgets"], 'error: the server doesn\'t have a resource type "gadgets"'),
        (
            ["get", "svc", "x", "-A"],
            "error: a resource cannot be retrieved by name across all namespaces",
        ),
        (
            ["get", "svc", "x", "-l", "a=b"],
            "error: name cannot be provided when a selector is specified",
        ),
        (["delete", "svc"], "error: give -f FILE or KIND NAME... to delete"),
        (["delete", "svc", "x", "-f", "y.yaml"], "error: give either -f or KIND NAME..., not both"),
        (["describe", "pods", "x"], "error: describe supports services only, not pods"),
        (["apply"], "error: the following arguments are required: -f/--filename"),
        (["registry", "--service-cidr", "10.0.0.0/33"], "error: --service-cidr: "),
        (["registry", "--node-port-range", "5-1"], "error: --node-port-range: "),
        (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for c in cli.COMMANDS:
        assert c.name in out
