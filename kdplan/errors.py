"""Typed errors. User errors and internal bugs are different exceptions.

- ``InputError``   -> exit 2: unreadable file, unknown preset, invalid field or flag.
- ``Infeasible``   -> exit 3: nothing fits; the message names the binding constraint and the
  smallest change that would fit.
- ``SolverLimit``  -> exit 1: the solver's time limit passed before it found any layout.
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


class DifferentTokenizers(InputError):
    """Teacher and student have different tokenizers, so KD on logits cannot compare their ids
    (kdplan.models.kd_vocab_size). Bad input only where logit KD was asked for: otherwise the
    planner distils such a pair at sequence level (kdplan.jobs.resolve)."""


class Infeasible(KdplanError):
    """No layout fits. ``binding`` names the constraint, ``suggestion`` what would fit."""

    exit_code = 3

    def __init__(self, message: str, *, binding: str = "", suggestion: str = ""):
        super().__init__(message)
        self.binding = binding
        self.suggestion = suggestion


class SolverLimit(KdplanError):
    """The solver stopped at its time limit before finding any layout (exit 1: not a verdict on
    the job, which may well fit; the limit was too short)."""

    exit_code = 1

    def __init__(self, time_limit_s: float):
        self.time_limit_s = time_limit_s
        limit = f"{time_limit_s * 1e3:.4g} ms" if time_limit_s < 1 else f"{time_limit_s:.4g} s"
        super().__init__(f"the solver hit its {limit} time limit before finding any layout; raise "
                         "[solver] time_limit_s")


class NotImplementedYet(KdplanError):
    """A command whose implementation has not landed."""

    exit_code = 1
