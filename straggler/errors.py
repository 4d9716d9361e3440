"""Typed errors and the exit codes every command shares."""

EXIT_OK = 0  # healthy
EXIT_STRAGGLERS = 1  # ran, and found stragglers
EXIT_FAILED = 2  # could not run: bad input, bad config, a probe that failed


class StragglerError(Exception):
    """An error a user can act on. Its message is one line saying what is wrong."""

    exit_code = EXIT_FAILED


class InputError(StragglerError):
    """A file, column, row or argument the user gave is wrong."""


class ConfigError(StragglerError):
    """The configuration is invalid. The message lists every bad key at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class ProbeError(StragglerError):
    """A probe or a worker failed, hung past its deadline or died."""
