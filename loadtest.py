"""Drive orders through the gateway and report throughput, latency and the audit.

A thin entry point: the load generator is the `loadgen` package (`python -m loadgen` is the
same); `python loadtest.py --help` lists the options.
"""

import sys

from loadgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
