"""The actors of the order service: thin shells that carry out what ``saga`` decides.

Nothing happens on import. The Thespian fixes (``runtime.thespian_fixes``) are applied explicitly
by whatever starts an actor system (``runtime.bridge``, the benchmark, the tests).
"""
