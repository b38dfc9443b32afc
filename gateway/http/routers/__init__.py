"""The HTTP API's routes, one router per resource; ``gateway.http.app`` assembles them."""
