"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config key, data root, file) described in words a user can act on."""


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""
