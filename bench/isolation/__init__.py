"""What one client, hostile or careless, can do to another (``python -m bench.isolation``, as root).
docs/benchmarks.md, "Isolation"."""
