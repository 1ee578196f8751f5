"""User-facing errors. The CLI turns these into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a file, a field, a model name. Never a bug in lmsmith."""


class DataError(UserError):
    """A malformed data file. The message names the file, the line and the field."""

    def __init__(self, path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")
