"""`python -m loadgen`: the same as `python loadtest.py`."""

import sys

from loadgen.cli import main

sys.exit(main())
