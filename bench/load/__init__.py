"""The request path: the daemon against the model in-process at 1-64 clients, transport alone, the
daemon's CPU per frame (``python -m bench.load``), what statistics cost
(``python -m bench.load.metrics_cost``), and the CPU preprocessing against a memory copy
(``python -m bench.load.preprocess``). docs/benchmarks.md, first part, "Metrics on vs off" and
"Preprocessing on a CPU"."""
