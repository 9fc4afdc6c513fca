"""Fixtures for tests and benchmarks: adapters with random weights, registered like trained ones.

Nothing in the package imports this; it sits above ``runtime/`` and may use every floor.
"""
