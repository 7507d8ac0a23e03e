"""The eBPF datapath: the tc program's loader, maps, map programmer, conntrack GC, test runner."""

from ebpflb.datapath.programmer import Backend, Frontend, Programmer, SyncStats

__all__ = ["Backend", "Frontend", "Programmer", "SyncStats"]
