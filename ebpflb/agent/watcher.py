"""Keeps a resumable Watch per kind open against the registry and feeds one queue."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient, RegistryError, Watch
from ebpflb.objects import key_of

log = logging.getLogger("ebpflb.agent")


@dataclass(frozen=True, slots=True)
class Change:
    """An object added/modified (obj set) or deleted (obj None)."""

    kind: str
    obj: Any  # what the watcher's keep() made of the pb.Object (by default: itself)
    key: object  # ebpflb.objects.Key


@dataclass(frozen=True)
class Changes:
    """The changes one watch message brought, in order: queued together, so that a bulk's
    thousands of events cost the agent a few queue operations, not one each."""

    kind: str
    changes: list[Change]


@dataclass(frozen=True)
class Relist:
    """The watch of `kind` restarts from scratch: forget what it said before."""

    kind: str


@dataclass(frozen=True)
class Synced:
    """Everything `kind` had when the watch (re)started has been delivered."""

    kind: str


Message = Changes | Relist | Synced


class KindWatcher(threading.Thread):
    """Watches one kind for as long as the agent runs. After a disconnect it resumes
    from the last revision it saw (nothing is missed or repeated); when the registry
    no longer has that revision it relists. The datapath is never touched here.

    keep: what of each object to queue. The agent keeps a compact record, made here
    as each event arrives: an event of a BATCH message keeps the whole batch alive
    for as long as it is referenced, and a bulk Apply's backlog would hold them all."""

    def __init__(
        self,
        client: RegistryClient,
        kind: str,
        out: queue.Queue[Message],
        stop: threading.Event,
        keep: Callable[[pb.Object], Any] = lambda obj: obj,
    ) -> None:
        super().__init__(name=f"watch-{kind}", daemon=True)
        self.client = client
        self.kind = kind
        self.out = out
        self.stop_event = stop
        self.keep = keep
        self.revision = ""
        self._watch: Watch | None = None
        self.connected = threading.Event()

    def cancel(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def run(self) -> None:
        backoff = 0.05
        while not self.stop_event.is_set():
            try:
                listing = self.revision == ""
                if listing:
                    # The current state comes first as ADDED events, ending in a BOOKMARK.
                    self.out.put(Relist(self.kind))
                self._watch = self.client.watch(kind=self.kind, resource_version=self.revision)
                for events in self._watch.messages():
                    backoff = 0.05
                    self.connected.set()
                    listing = self._handle(events, listing)
                    if self.stop_event.is_set():
                        return
            except RegistryError as e:
                self.connected.clear()
                if self.stop_event.is_set():
                    return
                if e.reason == "Expired":
                    log.warning("watch %s: %s; relisting", self.kind, e.details)
                    self.revision = ""
                    continue
                log.warning("watch %s: %s; retrying in %.1fs", self.kind, e.details, backoff)
            self.stop_event.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _handle(self, events: Sequence[pb.WatchEvent], listing: bool) -> bool:
        """Queue one message's events; returns whether the initial list is still being sent."""
        changes: list[Change] = []
        revision = self.revision
        for ev in events:
            if ev.type == pb.WatchEvent.BOOKMARK:
                revision = ev.resource_version
                if listing:
                    self._queue(changes, revision)
                    changes = []
                    self.out.put(Synced(self.kind))
                listing = False
                continue
            obj = ev.object
            kept = None if ev.type == pb.WatchEvent.DELETED else self.keep(obj)
            changes.append(Change(self.kind, kept, key_of(obj)))
            if not listing:
                # Listed objects carry their own (older) revisions: resume only from live ones.
                revision = ev.resource_version
        self._queue(changes, revision)
        return listing

    def _queue(self, changes: list[Change], revision: str) -> None:
        """Queue changes; a watch that starts again resumes after them (revision)."""
        if changes:
            self.out.put(Changes(self.kind, changes))
        self.revision = revision
