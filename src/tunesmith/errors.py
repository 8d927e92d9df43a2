"""Errors a user can act on. The CLI prints these as one clear message, not a traceback."""


class TunesmithError(Exception):
    """Base class: the message names the file/field/model and says how to fix it."""


class ConfigError(TunesmithError):
    pass


class DataError(TunesmithError):
    pass


class ModelError(TunesmithError):
    pass
