"""The result cache and the embedding store: hit latency, throughput with repeats, hashing, search,
near-duplicates (``python -m bench.cache``), what the cache costs when it cannot help
(``python -m bench.cache.cost``) and near-duplicates through a daemon (``python -m bench.cache.near``).
docs/benchmarks.md, "Result cache and embeddings" and "Near-duplicates"."""
