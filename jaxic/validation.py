"""Placeholder until the validation module lands."""
from jaxic.errors import JaxicError


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JaxicError(f"{name} must be a positive integer, got {value!r}.")
    return value
