"""What the fuzz tests share: how many examples, the tally of inputs and crashes, and
the properties every error must have (one line; Kubernetes' `path: Type...`)."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import KINDS, load_documents
from ebpflb.validation import ErrorType, FieldError

# ------------------------------------------------------------------ how much to try

# EBPFLB_FUZZ_EXAMPLES scales every fuzz test: the loader's tests try that many inputs
# each, the stateful registry tests a proportional number of sequences.
BASE_EXAMPLES = 200
EXAMPLES = int(os.environ.get("EBPFLB_FUZZ_EXAMPLES", str(BASE_EXAMPLES)))


def examples(at_base: int) -> int:
    """at_base examples in the default run, scaled by EBPFLB_FUZZ_EXAMPLES."""
    return max(1, at_base * EXAMPLES // BASE_EXAMPLES)


def fuzz_settings(at_base: int, steps: int | None = None) -> settings:
    """No deadline (a loaded 2-core machine is slow), no database writes left behind
    except Hypothesis' own .hypothesis/ (ignored by git)."""
    extra = {} if steps is None else {"stateful_step_count": steps}
    return settings(
        max_examples=examples(at_base),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        **extra,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ the tally


@dataclass
class Tally:
    """One fuzz target's counts: inputs tried, crashes (an exception the code under
    test must never raise), and named outcomes (refused, round trips...)."""

    tried: int = 0
    crashes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


TALLIES: dict[str, Tally] = {}


def tally(target: str) -> Tally:
    return TALLIES.setdefault(target, Tally())


class Crash(AssertionError):
    """The code under test raised what it never should; counted as a crash."""


@contextmanager
def counted(target: str) -> Iterator[Tally]:
    """Count one input tried on target; an exception other than an assertion (a
    property that failed) is a crash: counted, then raised as Crash."""
    t = tally(target)
    t.tried += 1
    try:
        yield t
    except AssertionError:
        raise
    except Exception as e:
        t.crashes += 1
        raise Crash(f"{target}: {type(e).__name__}: {e}") from e


def crashed(target: str, e: BaseException) -> Crash:
    tally(target).crashes += 1
    return Crash(f"{target}: {type(e).__name__}: {e}")


# ------------------------------------------------------------------ what errors look like

# A Kubernetes field path: spec.ports[0].nodePort, metadata.labels, endpoints[1].addresses[0]
_NAME = r"[A-Za-z][A-Za-z0-9]*(?:\[\d+\])*"
FIELD_PATH = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_TYPES = "|".join(re.escape(t.text) for t in ErrorType)
FIELD_ERROR = re.compile(rf"(?P<path>{FIELD_PATH.pattern}): (?P<type>{_TYPES})(?:: .*)?")


def assert_one_line(message: str) -> None:
    """A clear error: not empty, one line by every line break Python knows."""
    assert message.strip(), "empty message"
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"


def assert_field_error(e: FieldError) -> None:
    """Rendered as Kubernetes' field.Error: `path: Type` then `: value: detail`."""
    text = str(e)
    assert_one_line(text)
    m = FIELD_ERROR.fullmatch(text)
    assert m is not None, f"not `path: Type...`: {text!r}"
    assert m["path"] == e.path


# ------------------------------------------------------------------ the users' manifests


def manifests_dir() -> Path:
    """$EBPFLB_MANIFESTS, or shared/manifests beside the repository."""
    env = os.environ.get("EBPFLB_MANIFESTS")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "manifests"


def manifest_texts() -> list[str]:
    return [f.read_text() for f in sorted(manifests_dir().glob("*.yaml"))]


def manifest_docs() -> list[dict[str, object]]:
    return [d for text in manifest_texts() for d in load_documents(text)]


def field_names() -> list[str]:
    """Every field name (JSON and proto spelling) of every kind, for mutations."""
    names: set[str] = set()
    seen: set[str] = set()

    def walk(desc: object) -> None:
        full = desc.full_name  # type: ignore[attr-defined]
        if full in seen:
            return
        seen.add(full)
        for f in desc.fields:  # type: ignore[attr-defined]
            names.update((f.name, f.json_name))
            if f.message_type is not None:
                walk(f.message_type)

    for k in KINDS.values():
        walk(k.message.DESCRIPTOR)
    return sorted(names)


def registry_owned(obj: pb.Object) -> pb.Object:
    """A copy without what the registry sets on every write (for comparisons)."""
    out = pb.Object()
    out.CopyFrom(obj)
    meta = getattr(out, out.WhichOneof("kind") or "service").metadata
    meta.ClearField("uid")
    meta.ClearField("creation_timestamp")
    meta.ClearField("resource_version")
    meta.ClearField("generation")
    return out
