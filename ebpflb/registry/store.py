"""Durable storage for the registry: objects and the event log, behind one small interface."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import Key

# SQLite's own default: checkpoint once the WAL holds 1,000 pages of 4 KiB.
CHECKPOINT_BYTES = 4 * 1024 * 1024

log = logging.getLogger("ebpflb.registry")

ADDED = pb.WatchEvent.ADDED
MODIFIED = pb.WatchEvent.MODIFIED
DELETED = pb.WatchEvent.DELETED


@dataclass(frozen=True)
class Event:
    """One change: the revision it got, what happened, and the object after it
    (for DELETED, the object as it was last stored)."""

    rev: int
    type: int  # pb.WatchEvent.Type
    key: Key
    obj: pb.Object
    data: bytes = b""  # obj serialized, when its writer had it: made once, for store and watch

    def wire(self) -> bytes:
        """obj serialized."""
        return self.data or self.obj.SerializeToString()


@dataclass(frozen=True)
class Snapshot:
    """What a store holds when the registry starts."""

    revision: int  # the last revision written
    compacted: int  # events at or below this revision are gone
    objects: list[tuple[pb.Object, int]]  # (object, revision of its last change)
    events: list[Event]  # the retained events, oldest first


class Store(Protocol):
    """Where the registry keeps its state. commit() is atomic and durable on return."""

    def load(self) -> Snapshot: ...

    def commit(self, events: list[Event]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store several registries write to. commit() raises StoreConflict unless the
    store's revision is still the one just before events[0]; a registry then takes
    the events it missed with events_after() and tries again. wait_events() is how a
    registry follows the others' writes."""

    def events_after(self, revision: int) -> list[Event]: ...

    def wait_events(self, revision: int, timeout: float) -> list[Event]: ...


class StoreError(RuntimeError):
    """The store could not write or read; the change was not made."""


class StoreConflict(StoreError):
    """Another registry wrote first: the store is past the revision this commit follows."""


class StoreGap(StoreError):
    """The events after a revision are compacted away: reload the whole state."""


def _key_text(key: Key) -> str:
    return f"{key.kind}/{key.namespace}/{key.name}"


def _key_from_text(text: str) -> Key:
    kind, ns, name = text.split("/", 2)
    return Key(kind, ns, name)


class SqliteStore:
    """SQLite in WAL mode with synchronous=FULL: a commit that returned survives kill -9
    and power loss. One writer (this registry process) at a time."""

    def __init__(self, path: str, history: int = 100_000) -> None:
        self.path = path
        self.history = history
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        # Checkpoints (copying the WAL into the database file, and its fsync) run on a
        # thread of their own: a commit then waits for its WAL write alone, where
        # SQLite would otherwise checkpoint at the end of every large commit.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS objects (
                key TEXT PRIMARY KEY, rev INTEGER NOT NULL, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS events (
                rev INTEGER PRIMARY KEY, type INTEGER NOT NULL,
                key TEXT NOT NULL, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        self._unchecked = 0  # bytes committed since the last checkpoint was asked for
        self._checkpoint_due = threading.Event()
        self._closing = False
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Checkpoints after commits that wrote about CHECKPOINT_BYTES, on a connection
        of its own: they run while the next commit appends to the WAL."""
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=10000")
            while True:
                self._checkpoint_due.wait()
                if self._closing:
                    return
                self._checkpoint_due.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    log.warning("sqlite %s: checkpoint: %s", self.path, e)
        finally:
            db.close()

    def _meta(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def load(self) -> Snapshot:
        with self._lock:
            revision = self._meta("revision")
            compacted = self._meta("compacted")
            objects = []
            for data, rev in self._db.execute("SELECT data, rev FROM objects"):
                obj = pb.Object()
                obj.ParseFromString(data)
                objects.append((obj, int(rev)))
            events = []
            for rev, typ, key, data in self._db.execute(
                "SELECT rev, type, key, data FROM events ORDER BY rev"
            ):
                obj = pb.Object()
                obj.ParseFromString(data)
                events.append(Event(int(rev), int(typ), _key_from_text(key), obj, data))
        return Snapshot(revision, compacted, objects, events)

    def commit(self, events: list[Event]) -> None:
        if not events:
            return
        last = events[-1].rev
        with self._lock:
            try:
                rows = [(ev.rev, ev.type, _key_text(ev.key), ev.wire()) for ev in events]
                # Each key's last event decides what the objects table holds.
                final = {k: (rev, typ, data) for rev, typ, k, data in rows}
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "DELETE FROM objects WHERE key = ?",
                    [(k,) for k, (_, typ, _) in final.items() if typ == DELETED],
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO objects (key, rev, data) VALUES (?, ?, ?)",
                    [(k, rev, data) for k, (rev, typ, data) in final.items() if typ != DELETED],
                )
                self._db.executemany(
                    "INSERT INTO events (rev, type, key, data) VALUES (?, ?, ?, ?)", rows
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('revision', ?)", (last,)
                )
                floor = last - self.history
                if floor > 0 and floor > self._meta("compacted") + self.history // 10:
                    self._db.execute("DELETE FROM events WHERE rev <= ?", (floor,))
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES ('compacted', ?)",
                        (floor,),
                    )
                self._db.execute("COMMIT")
                self._unchecked += sum(len(data) for _, _, _, data in rows) * 2
                if self._unchecked >= CHECKPOINT_BYTES:
                    self._unchecked = 0
                    self._checkpoint_due.set()
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"sqlite {self.path}: {e}") from e

    def close(self) -> None:
        """Stops the checkpointer, then closes: the last connection closed checkpoints
        what is left and removes the WAL."""
        self._closing = True
        self._checkpoint_due.set()
        self._checkpointer.join()
        with self._lock:
            self._db.close()


def open_store(url: str, history: int = 100_000) -> Store:
    """A store from its URL: sqlite:///abs/path.db (or sqlite://rel/path.db), or
    etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (shared by several registries)."""
    u = urlparse(url)
    if u.scheme == "etcd":
        from ebpflb.registry.etcd import EtcdStore, parse_etcd_url

        endpoints, prefix = parse_etcd_url(url)
        return EtcdStore(endpoints, prefix=prefix, history=history)
    if u.scheme == "sqlite":
        path = (u.netloc + u.path) if u.netloc else u.path
        if not path:
            raise ValueError(f"store URL {url!r} names no file")
        return SqliteStore(path, history=history)
    raise ValueError(
        f"unsupported store URL {url!r}: expected sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]"
    )
