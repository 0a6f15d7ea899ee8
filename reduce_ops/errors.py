"""Exceptions that the CLI turns into one clear line and a non-zero exit."""


class ReduceOpsError(Exception):
    """Bad input or state the user can fix; the message is shown as is."""

    exit_code = 2


class ConfigError(ReduceOpsError):
    """A parameter is unknown, of the wrong type or out of range."""


class DataError(ReduceOpsError):
    """A dataset is missing, unreadable or inconsistent."""


class FaultMapError(ReduceOpsError):
    """A fault map or fleet is malformed."""


class TrackingError(ReduceOpsError):
    """MLflow holds nothing usable for the request (no run, unknown chip...)."""


class ServerExitError(ReduceOpsError):
    """A server that reduce-ops started (the MLflow UI) exited by itself with an error."""

    exit_code = 1
