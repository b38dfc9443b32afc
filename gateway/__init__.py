"""The client interfaces: the msgpack gateway (length-prefixed frames on a socket)."""
