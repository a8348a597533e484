"""inferd.daemon: the server process, one sub-package per stage of the request path (docs/architecture.md, Layout)."""
