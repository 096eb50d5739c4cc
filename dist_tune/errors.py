"""User-facing errors: each carries one actionable line, printed by the CLI without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, model path, options); the message names the problem and the fix."""


class DataError(UserError):
    """A dataset that cannot be read or used as configured."""


class TrainingError(UserError):
    """Training cannot go on as configured (e.g. non-finite losses under train.nan_policy=stop)."""
