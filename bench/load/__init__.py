"""The request path: the daemon against the model in-process at 1-64 clients, transport alone, the
daemon's CPU per frame (``python -m bench.load``), and what statistics cost
(``python -m bench.load.metrics_cost``). docs/benchmarks.md, first part and "Metrics on vs off"."""
