"""python -m ebpflb.bench: the same as `ebpflb bench`."""

import sys

from ebpflb.bench.cli import main

sys.exit(main())
