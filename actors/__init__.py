"""The actors of the order service.

Importing the package installs the Thespian fixes of ``actors.thespian_fixes`` once, so every
actor system this code runs in (run.py, tests, benchmarks) gets them.
"""

from actors import thespian_fixes

thespian_fixes.apply()
