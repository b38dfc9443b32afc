"""The HTTP API and the web console, served beside the msgpack gateway in the node's process."""
