"""inferd.shm: byte layouts shared by the daemon and its clients (ring, wire frames). No asyncio, no torch."""
