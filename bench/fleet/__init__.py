"""Hosts sharing a result cache on Redis (``python -m bench.fleet``; needs redis-server).
docs/benchmarks.md, "Fleet"."""
