"""The daemon's exit codes (sysexits.h values where one fits); docs/operations.md explains each."""
OK = 0                 # stopped by SIGTERM/SIGINT after draining
USAGE = 64             # bad command line
UNAVAILABLE = 69       # the socket path is taken (a live daemon answers on it, or it is not a socket)
STARTUP_FAILED = 70    # a device could not load or warm the model, or another start-up failure
NO_SPACE = 73          # the cache or embedding store file cannot have its blocks: its filesystem is full
CONFIG = 78            # a configuration value is invalid; the message names the key
