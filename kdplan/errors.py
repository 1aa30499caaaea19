"""Typed errors. User errors and internal bugs are different exceptions.

- ``InputError``   -> exit 2: unreadable file, unknown preset, invalid field or flag.
- ``Infeasible``   -> exit 3: nothing fits; the message names the binding constraint and the
  smallest change that would fit.
- anything else    -> exit 1: an internal error (a bug), reported with a traceback only under
  ``KDPLAN_DEBUG=1``.
"""

from __future__ import annotations


class KdplanError(Exception):
    """Base for errors kdplan explains to the user in one line."""

    exit_code = 1


class InputError(KdplanError):
    """Bad input: the message names the file and the field."""

    exit_code = 2


class Infeasible(KdplanError):
    """No layout fits. ``binding`` names the constraint, ``suggestion`` what would fit."""

    exit_code = 3

    def __init__(self, message: str, *, binding: str = "", suggestion: str = ""):
        super().__init__(message)
        self.binding = binding
        self.suggestion = suggestion


class NotImplementedYet(KdplanError):
    """A command whose implementation has not landed."""

    exit_code = 1
