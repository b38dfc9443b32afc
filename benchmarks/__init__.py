"""Benchmarks: the bare-Thespian reference saga the full system is compared against."""
