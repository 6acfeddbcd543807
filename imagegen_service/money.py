"""Money is integer micro-dollars everywhere inside; decimal strings only at the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000


def parse_usd(text: str | int) -> int:
    """Turns a decimal USD amount ("0.04", "12", 3) into micro-dollars, exactly.

    Refuses floats, fractions of a micro-dollar, and anything that is not a finite number.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"amount must be a decimal string, not {type(text).__name__}")
    try:
        amount = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {text!r}") from None
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {text!r}")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"amount {text!r} is finer than one micro-dollar")
    return int(micros)


def format_usd(micros: int) -> str:
    """Micro-dollars as a decimal USD string with six places: 1500000 -> "1.500000"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"
