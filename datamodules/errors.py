"""The user errors of the project: one base class, `UserError`, and the tuple both command lines catch.

A user error (a bad record, video, setting, path or checkpoint) is printed as one line, `error: MESSAGE`,
with exit status 2 by `python main.py` and `python -m datamodules`, never as a traceback.

Every `UserError` pickles with its message and attributes (`__reduce__` replays the constructor's
arguments), so one raised in a process pool arrives whole. PyTorch's DataLoader workers do not pickle the
exception: they send its type and formatted traceback, which the main process re-raises as a `RuntimeError`
("Caught VideoError in DataLoader worker process 0. Original Traceback ..."); `user_error_message` reads the
original one-line message back out of that.
"""

from __future__ import annotations

import re
from typing import Any


class UserError(Exception):
    """An error that is the user's to fix; its message names the file, record, field or setting."""

    _init_args: tuple[Any, ...] = ()

    def __init__(self, *args: Any):
        self._init_args = args
        super().__init__(*args)

    def __reduce__(self):
        return _rebuild, (type(self), self._init_args, self.__dict__)


def _rebuild(cls: type[UserError], args: tuple[Any, ...], state: dict[str, Any]) -> UserError:
    error = cls(*args)
    error.__dict__.update(state)
    return error


# Errors that are the user's to fix, printed as one line with exit status 2 by both command lines. OSError:
# a missing, unreadable or unwritable path the user gave (including Hugging Face's "not a local folder and
# not a valid model identifier").
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)

# torch.utils.data's ExceptionWrapper.reraise: "Caught {type} {where}.\nOriginal {traceback}".
_WORKER = re.compile(r"\ACaught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _user_error_names() -> set[str]:
    names, pending = set(), [UserError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, also of one raised in a DataLoader worker or one that another
    error was raised from (`raise ... from error`: jsonargparse wraps the errors of a config's classes
    that way); None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = _own_message(current)
        if message is not None:
            return message
        current = current.__cause__
    return None


def _own_message(error: BaseException) -> str | None:
    if isinstance(error, USER_ERRORS) and not _WORKER.match(str(error)):
        return str(error) if isinstance(error, UserError) else _os_error_line(error)
    match = _WORKER.match(str(error))
    if match is None or match["name"] not in _user_error_names():
        return None
    # The traceback's last line is "module.Name: message" (chained exceptions come before it).
    last = str(error).rstrip("\n").rsplit("\n", 1)[-1]
    prefix = re.match(rf"\A(?:[\w.]+\.)?{re.escape(match['name'])}: ", last)
    return last[prefix.end():] if prefix else None


def _os_error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__
