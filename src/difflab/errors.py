"""User-facing errors: one line that names the problem, the value and the fix."""


class UserError(ValueError):
    """Bad input from a user (config, data, paths, options).

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """
