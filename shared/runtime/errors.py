from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 1


class UsageError(UserError):
    """A bad combination of flags or values: exit code 2, like any other usage error."""

    exit_code = 2


class DivergedError(UserError):
    """Training produced NaN or inf (loss, gradients, weights or the model's probabilities)."""


SAMPLING_NOT_FINITE = "the model's next-token probabilities are not finite"  # both samplers say it alike


class Interrupted(UserError):
    """Ctrl-C during training: a resume point was saved, exit like any interrupted command."""

    exit_code = 130
