"""Kubernetes label syntax: selector strings (`a=b,!c`), selector maps, key and value rules."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

# ------------------------------------------------------------------ keys and values
#
# The rules and messages of k8s.io/apimachinery/pkg/util/validation (IsQualifiedName,
# IsValidLabelValue, IsDNS1123Subdomain), word for word, so errors read as kubectl's do.

LABEL_NAME_MAX_LENGTH = 63
LABEL_VALUE_MAX_LENGTH = 63
DNS1123_SUBDOMAIN_MAX_LENGTH = 253

_LABEL_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_NAME_RE = re.compile(_LABEL_NAME_FMT)
_LABEL_NAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)
_LABEL_VALUE_FMT = f"({_LABEL_NAME_FMT})?"
_LABEL_VALUE_RE = re.compile(_LABEL_VALUE_FMT)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, "
    "'-', '_' or '.', and must start and end with an alphanumeric character"
)

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = f"{_DNS1123_LABEL_FMT}(\\.{_DNS1123_LABEL_FMT})*"
_DNS1123_SUBDOMAIN_RE = re.compile(_DNS1123_SUBDOMAIN_FMT)
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f"}
_GO_ESCAPES |= {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(s: str) -> str:
    """Go's strconv.Quote (`%q`), as Kubernetes quotes a value in a message: never more
    than one line, whatever s holds."""
    out = []
    for c in s:
        if c in _GO_ESCAPES:
            out.append(_GO_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def max_len_error(length: int) -> str:
    """Kubernetes' "too long" explanation."""
    return f"must be no more than {length} characters"


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    """Kubernetes' explanation of a failed pattern (its odd double space included)."""
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    shown = " or ".join(f"'{e}', " for e in examples)
    return f"{msg} (e.g. {shown}regex used for validation is '{fmt}')"


def dns1123_subdomain_errors(value: str) -> list[str]:
    """Why value is not a DNS-1123 subdomain (`example.com`); [] when it is.

    Here because a label key's prefix must be one; validation re-exports it.
    """
    errs = []
    if len(value) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        errs.append(max_len_error(DNS1123_SUBDOMAIN_MAX_LENGTH))
    if not _DNS1123_SUBDOMAIN_RE.fullmatch(value):
        errs.append(regex_error(_DNS1123_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


def label_key_errors(key: str) -> list[str]:
    """Why key is not a label key (a "qualified name": `[prefix/]name`); [] when it is.

    The optional prefix is a DNS-1123 subdomain, the name at most 63 alphanumerics,
    '-', '_' and '.', starting and ending alphanumeric.
    """
    errs: list[str] = []
    parts = key.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend(f"prefix part {m}" for m in dns1123_subdomain_errors(prefix))
    else:
        return [
            "a qualified name "
            + regex_error(_LABEL_NAME_MSG, _LABEL_NAME_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > LABEL_NAME_MAX_LENGTH:
        errs.append("name part " + max_len_error(LABEL_NAME_MAX_LENGTH))
    if not _LABEL_NAME_RE.fullmatch(name):
        errs.append(
            "name part "
            + regex_error(_LABEL_NAME_MSG, _LABEL_NAME_FMT, "MyName", "my.name", "123-abc")
        )
    return errs


def label_value_errors(value: str) -> list[str]:
    """Why value is not a label value (empty, or a name of at most 63 characters); [] when it is."""
    errs = []
    if len(value) > LABEL_VALUE_MAX_LENGTH:
        errs.append(max_len_error(LABEL_VALUE_MAX_LENGTH))
    if not _LABEL_VALUE_RE.fullmatch(value):
        errs.append(regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return errs


def is_label_key(key: str) -> bool:
    return not label_key_errors(key)


def is_label_value(value: str) -> bool:
    return not label_value_errors(value)


# ------------------------------------------------------------------ selectors


class SelectorError(ValueError):
    """A label selector string that does not parse; the message says where and why."""


class Operator(StrEnum):
    EXISTS = "exists"  # a
    DOES_NOT_EXIST = "!"  # !a
    EQUALS = "="  # a=b, a==b
    NOT_EQUALS = "!="  # a!=b
    IN = "in"  # a in (b,c)
    NOT_IN = "notin"  # a notin (b,c)
    GREATER_THAN = ">"  # a>1 (both integers)
    LESS_THAN = "<"  # a<1


_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Requirement:
    """One condition of a selector: key, operator, values (sorted, for in/notin)."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        present = self.key in labels
        if op is Operator.EXISTS:
            return present
        if op is Operator.DOES_NOT_EXIST:
            return not present
        if op in (Operator.EQUALS, Operator.IN):
            return present and labels[self.key] in self.values
        if op in (Operator.NOT_EQUALS, Operator.NOT_IN):
            # As in Kubernetes: a missing label is "not equal" to anything.
            return not present or labels[self.key] not in self.values
        # Greater/less than: both sides must be integers, else no match.
        if not present or not _INTEGER_RE.fullmatch(labels[self.key]):
            return False
        have, want = int(labels[self.key]), int(self.values[0])
        return have > want if op is Operator.GREATER_THAN else have < want

    def __str__(self) -> str:
        op = self.operator
        if op is Operator.EXISTS:
            return self.key
        if op is Operator.DOES_NOT_EXIST:
            return f"!{self.key}"
        if op in (Operator.IN, Operator.NOT_IN):
            return f"{self.key} {op.value} ({','.join(self.values)})"
        return f"{self.key}{op.value}{self.values[0]}"


@dataclass(frozen=True)
class Selector:
    """Requirements that must all hold (sorted by key). No requirements selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def selects_everything(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        """The canonical string form; parse_selector(str(s)) == s."""
        return ",".join(str(r) for r in self.requirements)

    @classmethod
    def from_map(cls, selector: Mapping[str, str]) -> Selector:
        """The selector `k1=v1,k2=v2` of a map. Keys and values are not checked."""
        reqs = (Requirement(k, Operator.EQUALS, (v,)) for k, v in selector.items())
        return cls(tuple(sorted(reqs, key=lambda r: r.key)))


def parse_selector(text: str) -> Selector:
    """A Kubernetes label selector string, as `kubectl get -l` takes it.

    Comma-separated requirements, all of which must hold: `a=b` (or `a==b`),
    `a!=b`, `a in (x,y)`, `a notin (x)`, `a` (has the label), `!a` (has not),
    `a>1`, `a<1` (integer comparison). Whitespace around tokens is ignored. An
    empty (or blank) string selects everything. Keys must be label keys and
    values label values; anything else raises SelectorError.
    """
    return _Parser(text).selector()


def matches_map(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether labels has every key=value of selector (a Service's spec.selector).

    An empty selector matches every label set, as sets do. A *Service* with an
    empty selector selects no pods, though: Kubernetes treats it as "endpoints
    are managed by hand". That is the caller's decision, so check
    `if svc.spec.selector and matches_map(...)` there.
    """
    return all(k in labels and labels[k] == v for k, v in selector.items())


# The lexer's tokens: these symbols, identifiers, and the end of the string.
_SYMBOLS = ("!=", "==", "!", "=", "(", ")", ",", ">", "<")
_SPECIAL_CHARS = frozenset("!=(),><")
_IDENT = "identifier"
_END = "end"


@dataclass(frozen=True)
class _Token:
    kind: str  # one of _SYMBOLS, _IDENT or _END
    text: str
    pos: int

    def describe(self) -> str:
        return (
            "end of string"
            if self.kind == _END
            else f"{go_quote(self.text)} at position {self.pos}"
        )


def _tokens(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _SPECIAL_CHARS:
            sym = next(s for s in _SYMBOLS if text.startswith(s, i))
            yield _Token(sym, sym, i)
            i += len(sym)
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in _SPECIAL_CHARS:
                j += 1
            yield _Token(_IDENT, text[i:j], i)
            i = j
    yield _Token(_END, "", n)


class _Parser:
    """Recursive descent over the tokens, following k8s.io/apimachinery/pkg/labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_tokens(text))
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != _END:
            self.i += 1
        return tok

    def error(self, problem: str) -> SelectorError:
        return SelectorError(f"invalid label selector {go_quote(self.text)}: {problem}")

    def expected(self, what: str, tok: _Token) -> SelectorError:
        return self.error(f"expected {what}, found {tok.describe()}")

    def selector(self) -> Selector:
        if self.peek().kind == _END:
            return Selector()
        reqs = [self.requirement()]
        while (tok := self.take()).kind != _END:
            if tok.kind != ",":
                raise self.expected('"," or end of string', tok)
            reqs.append(self.requirement())
        return Selector(tuple(sorted(reqs, key=lambda r: r.key)))

    def requirement(self) -> Requirement:
        tok = self.take()
        if tok.kind == "!":
            return self.checked(self.key(), Operator.DOES_NOT_EXIST, ())
        if tok.kind != _IDENT:
            raise self.expected('a label key or "!"', tok)
        key = tok.text
        op = self.peek()
        if op.kind in (_END, ","):
            return self.checked(key, Operator.EXISTS, ())
        self.take()
        if op.kind in ("=", "=="):
            return self.checked(key, Operator.EQUALS, (self.exact_value(),))
        if op.kind == "!=":
            return self.checked(key, Operator.NOT_EQUALS, (self.exact_value(),))
        if op.kind == ">":
            return self.checked(key, Operator.GREATER_THAN, (self.exact_value(),))
        if op.kind == "<":
            return self.checked(key, Operator.LESS_THAN, (self.exact_value(),))
        if op.kind == _IDENT and op.text == "in":
            return self.checked(key, Operator.IN, self.value_set())
        if op.kind == _IDENT and op.text == "notin":
            return self.checked(key, Operator.NOT_IN, self.value_set())
        raise self.expected('an operator ("=", "==", "!=", "in", "notin", ">" or "<")', op)

    def key(self) -> str:
        tok = self.take()
        if tok.kind != _IDENT:
            raise self.expected("a label key", tok)
        return tok.text

    def exact_value(self) -> str:
        """The value after =, != , > or <; nothing (`a=`) is the empty value."""
        tok = self.peek()
        if tok.kind in (_END, ","):
            return ""
        if tok.kind != _IDENT:
            raise self.expected("a value", tok)
        return self.take().text

    def value_set(self) -> tuple[str, ...]:
        """`(x,y)`; an empty place between commas is the empty value, as in Kubernetes."""
        tok = self.take()
        if tok.kind != "(":
            raise self.expected('"("', tok)
        values: list[str] = []
        want_value = True
        while (tok := self.take()).kind != ")":
            if tok.kind == _IDENT and want_value:
                values.append(tok.text)
                want_value = False
            elif tok.kind == ",":
                if want_value:
                    values.append("")
                want_value = True
            else:
                raise self.expected('a value, "," or ")"' if want_value else '"," or ")"', tok)
        if want_value and values:
            values.append("")  # `(a,)`
        if not values:
            raise self.error('"in" and "notin" need at least one value')
        return tuple(sorted(set(values)))

    def checked(self, key: str, op: Operator, values: tuple[str, ...]) -> Requirement:
        if errs := label_key_errors(key):
            raise self.error(f"key {go_quote(key)}: {'; '.join(errs)}")
        for v in values:
            if op in (Operator.GREATER_THAN, Operator.LESS_THAN):
                if not _INTEGER_RE.fullmatch(v):
                    raise self.error(f'"{op.value}" needs an integer value, not {go_quote(v)}')
            elif errs := label_value_errors(v):
                raise self.error(f"value {go_quote(v)} for key {go_quote(key)}: {'; '.join(errs)}")
        return Requirement(key, op, values)
