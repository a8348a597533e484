"""The Open Inference Protocol front (KServe v2 over HTTP and gRPC): docs/oip.md."""
