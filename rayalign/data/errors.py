"""The error types of the data layer: one `RowError` per problem, all collected into one exception.

Every problem found in a data file is reported as `FILE:ROW: FIELD: what is wrong`, so a user sees all of
them at once and can jump to the line. ROW is the 1-based line number for line-oriented files (.jsonl,
.jsonl.gz, .csv) and the 1-based record index otherwise (.json, .parquet, save_to_disk directories, hub
datasets). Problems with the whole file (unreadable, empty, unsupported) use ROW 0 (or the line where a
stream broke off, e.g. a truncated gzip) and FIELD "-"; problems with a whole row (bad JSON, a row that
looks like another format) use FIELD "-" too.

This module only defines the types; it never reads files.
"""

from dataclasses import dataclass

#: FIELD used when a problem concerns a whole row or the whole file rather than one field.
WHOLE = "-"


@dataclass(frozen=True)
class RowError:
    file: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.field}: {self.message}"


class DataValidationError(Exception):
    """Raised when a data source has any invalid row; `errors` holds every problem found, in file order."""

    def __init__(self, errors: list[RowError]):
        self.errors = list(errors)
        shown = "\n".join(str(e) for e in self.errors[:20])
        more = len(self.errors) - 20
        if more > 0:
            shown += f"\n... and {more} more errors"
        super().__init__(f"{len(self.errors)} data error(s):\n{shown}")


def type_name(value: object) -> str:
    """The JSON-flavoured name of a value's type, for messages such as "must be a string, got int"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
