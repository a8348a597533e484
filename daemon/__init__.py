"""inferd.daemon: the server process (sessions, batching threads, models)."""
