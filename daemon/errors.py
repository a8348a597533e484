"""The error a bad configuration raises, in a module of its own so that everything that checks a
value (daemon/config.py, and the components whose checks need a file or a model: the fleet
cache's key file, labels, engine options, ...) raises the same class without importing the
configuration loader. ``__main__`` turns it into exit code 78 (EX_CONFIG) with its message.
"""
from __future__ import annotations


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key and the allowed values."""
