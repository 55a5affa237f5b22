"""Errors a user can fix: each message names the problem and the fix."""


class UserError(Exception):
    """Bad input (config, data, model or a combination). Printed as one line."""


def fail(problem: str, fix: str) -> "UserError":
    return UserError(f"{problem}. Fix: {fix}")
