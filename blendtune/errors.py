"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config key, data root, file) described in words a user can act on."""


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class OptionError(UserError):
    """An option of a strategy or dataset is out of range. `key` is the option's name; config code
    prefixes its section (`ogm.alpha`), the Python API names the keyword (`alpha`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"option '{key}': {message}")
        self.key, self.message = key, message

    def __reduce__(self):  # Ray pickles a worker's error to the driver: keep both arguments
        return type(self), (self.key, self.message)


class SettingError(UserError):
    """A run setting cannot work. `key` is its config key (`data.batch_size`): the one name every rule
    uses. The CLI prints "config key 'data.batch_size': ..."; the Python API names its keyword
    (`fit(batch_size=...)`), translating in one place (blendtune.api)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key, self.message = key, message

    def __reduce__(self):
        return type(self), (self.key, self.message)
