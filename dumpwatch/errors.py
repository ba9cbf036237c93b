"""The two kinds of expected failure: a bad file, and a bad configuration."""

from __future__ import annotations


class Rejected(Exception):
    """This file cannot be sorted, and waiting will not change that: it goes to quarantine.

    The message is the one-line reason written beside the file.
    """


class Incomplete(Rejected):
    """The file is shorter than its own header says: it may still be arriving."""


class ConfigError(Exception):
    """A configuration or rule file is wrong; the message names the file, line and key."""

    def __init__(self, message: str, path: object = None, line: int | None = None, key: str | None = None):
        self.path, self.line, self.key = path, line, key
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line else f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


class ConfigErrors(ConfigError):
    """Several mistakes in one configuration file: each on a line of its own, in the file's
    order, each naming the file, line and key."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        first = errors[0]
        Exception.__init__(self, "\n".join(str(error) for error in errors))
        self.path, self.line, self.key = first.path, first.line, first.key


class ServeFailed(Exception):
    """The observer or a worker died: exit non-zero, so that the supervisor restarts us."""
