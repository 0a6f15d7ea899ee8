"""Systolic-array geometry: the rows × cols grid of processing elements (PEs)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from reduce_ops.errors import FaultMapError


@dataclass(frozen=True)
class ArrayGeometry:
    """Size of a weight-stationary systolic array: rows index k (reduction), cols m (output)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            # bool is an Integral too; reject it along with floats and strings.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise FaultMapError(
                    f"array geometry: {name} must be a positive integer, got {value!r}"
                )
            object.__setattr__(self, name, int(value))  # numpy ints -> plain int

    @property
    def n_pes(self) -> int:
        """Number of processing elements in the array."""
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols), the shape of a fault map for this array."""
        return (self.rows, self.cols)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"
