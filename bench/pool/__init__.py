"""A pool of devices of known, different speeds (the ``synthetic`` model): dispatch policies,
removal of a failing device, faults, overload (``python -m bench.pool``). docs/benchmarks.md,
"Device pools"."""
