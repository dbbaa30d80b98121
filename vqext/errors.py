"""Exceptions that the CLI reports as one clear line (no traceback unless --debug)."""


class VqextError(Exception):
    """A user-facing error: bad input, bad configuration, missing file."""


class ConfigError(VqextError, ValueError):
    """An invalid architecture / encoding / hyper-parameter combination."""


class DataError(VqextError, ValueError):
    """A series that cannot be used: missing file or column, NaNs, too short."""


class PluginError(VqextError):
    """A plugin that failed to import or register."""


class Terminated(SystemExit):
    """SIGTERM reached the process: unwind and exit 128 + 15 (never mistaken for a plugin's sys.exit)."""
