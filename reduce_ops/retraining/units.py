"""The FAT runs `fat` does: a chip on its own, or an eFAT group of chips sharing its fused map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reduce_ops.hardware import FaultMap
from reduce_ops.records.groups import FusedGroup
from reduce_ops.records.plan import PlannedChip


@dataclass(frozen=True)
class ChipJob:
    """One chip to retrain: its plan row joined with its fault map."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # NaN when infeasible
    feasible: bool
    reason: str
    fault_map: FaultMap
    stuck: Any = None          # the chip's stuck register bits (hardware.fault_model stuck_at)


@dataclass(frozen=True)
class Unit:
    """What one FAT run trains: a chip on its own, or a group of chips sharing its fused map."""

    run_name: str                  # "chip <id>" or "group <id>"
    fault_map: FaultMap            # the chip's map, or the group's fused map
    planned_epochs: float
    members: tuple[ChipJob, ...]
    group_id: str = ""             # "" for a chip on its own

    @classmethod
    def chip(cls, job: ChipJob) -> Unit:
        return cls(f"chip {job.chip_id}", job.fault_map, job.planned_epochs, (job,))

    @property
    def stuck(self) -> Any:
        """A chip's stuck register bits (stuck-at hardware; eFAT groups are bypass only)."""
        return self.members[0].stuck if not self.group_id else None


def chip_jobs(planned: Sequence[PlannedChip], stuck: Mapping[str, Any] | None = None
              ) -> list[ChipJob]:
    """Every planned chip as a job, with its stuck bits for stuck-at hardware."""
    return [ChipJob(c.chip_id, c.fault_rate, c.planned_epochs, c.feasible, c.reason,
                    c.fault_map, (stuck or {}).get(c.chip_id)) for c in planned]


def units(jobs: Sequence[ChipJob], groups: Sequence[FusedGroup]) -> list[Unit]:
    """One unit per FAT run of the groups record (a lone chip is a group of one)."""
    by_id = {j.chip_id: j for j in jobs}
    out = []
    for g in groups:
        members = tuple(by_id[m.chip_id] for m in g.members)
        if g.shared:
            out.append(Unit(f"group {g.group_id}", g.fault_map, g.planned_epochs, members,
                            g.group_id))
        else:
            out.append(Unit.chip(members[0]))
    return out
