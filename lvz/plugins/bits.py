"""Bit helpers the chips share (the kernel's for_each_set_bit, in ascending order).

Chips never import each other; what they have in common lives here.
"""

from __future__ import annotations

__all__ = ["set_bits"]


def set_bits(value: int) -> list[int]:
    """Set bit numbers, ascending: the order the kernel walks pending bits (__ffs first)."""
    out = []
    while value:
        low = value & -value
        out.append(low.bit_length() - 1)
        value ^= low
    return out
