"""The eBPF datapath: loader, maps, map programmer, node settings, conntrack GC, test runner."""

from ebpflb.datapath.programmer import Backend, Frontend, Programmer, SyncStats

__all__ = ["Backend", "Frontend", "Programmer", "SyncStats"]
