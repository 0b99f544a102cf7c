"""Test support shipped with lvz: the daemon spawner, the raw wire client, the pytest plugin.

``spawn`` starts ``lvz serve`` for tests, the demo and the benchmarks alike; ``wire`` speaks the
protocol byte by byte for tests and benchmarks that must send what no client library would;
``pytest_plugin`` (registered as the ``lvz`` pytest11 entry point) turns both into fixtures.
None of them is imported by the daemon, and importing this package costs nothing.
"""
