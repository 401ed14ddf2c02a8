"""``python -m nodes.testbed ...``: the testbed commands, and the probes run inside namespaces."""

import sys

from nodes.testbed.cli import main

if __name__ == "__main__":
    sys.exit(main())
