"""The daemon's exit codes (sysexits.h values where one fits); docs/operations.md explains each.

systemd/inferd.service restarts the daemon on 70 alone (RestartPreventExitStatus= lists the others
that a failure can give): a restart cures a device that failed to warm, never a taken socket path,
a missing package or a bad configuration value.
"""
OK = 0                 # stopped by SIGTERM/SIGINT after draining
USAGE = 64             # bad command line
UNAVAILABLE = 69       # a socket path is taken (client or admin socket: a live daemon answers on it,
                       # or it is not a socket), or systemd passed something else than one listening
                       # Unix stream socket
NOT_INSTALLED = 69     # EX_UNAVAILABLE too: the daemon's packages are missing (a client-only install)
STARTUP_FAILED = 70    # a device could not load or warm the model, or another start-up failure
NO_SPACE = 73          # the cache or embedding store file cannot have its blocks: its filesystem is full
CONFIG = 78            # a configuration value is invalid; the message names the key
