"""Metrics and the store tail that feeds them, the live console and the order index."""
