"""The result cache and the embedding store: hit latency, throughput with repeats, hashing, search,
near-duplicates (``python -m bench.cache``), what the cache costs when it cannot help
(``python -m bench.cache.cost``) near-duplicates through a daemon (``python -m bench.cache.near``) and what sealing the
entries costs against the unsealed format (``python -m bench.cache.privacy``).
docs/benchmarks.md, "Result cache and embeddings" and "Near-duplicates"."""
