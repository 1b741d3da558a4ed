"""The one kind of refusal an operation raises."""

from __future__ import annotations


class OpError(Exception):
    """An expected refusal: nothing was changed (unless the message says otherwise).

    `status` and `code` are what the admin API answers; the CLI prints the message and
    exits 1 (2 for a name that is not a hostname). The message is for people.
    """

    def __init__(self, status: int, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.path = path  # the JSON path of an invalid file's problem
