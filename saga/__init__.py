"""Pure decisions about an order: no actors, no I/O.

The saga's state machine (``machine``), stock bookkeeping (``stock``), the order view built from
a stream (``views``) and the audit's checks over the store's events (``audit``). Everything here
is unit- and property-tested without an actor system.
"""
