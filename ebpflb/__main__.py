"""`python -m ebpflb`: the same as the `ebpflb` command."""

from ebpflb.cli import main

raise SystemExit(main())
