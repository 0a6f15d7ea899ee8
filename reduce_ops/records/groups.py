"""The groups record that `group` hands `fat` and `compare`: the FAT runs to do, each a chip on
its own or an eFAT group of chips sharing its fused fault map (the union of the members' faulty
PEs), with the epochs the plan gives that map. The fused maps are rebuilt from the fleet here,
once, and checked against the fault rates the group stage recorded."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reduce_ops import atomic
from reduce_ops.errors import DataError
from reduce_ops.grouping import Group, fuse
from reduce_ops.hardware import FaultMap
from reduce_ops.records import sets
from reduce_ops.records.plan import Plan

GROUP_COLUMNS = ["group_id", "members", "n_members", "fused_fault_rate",
                 "fused_pruned_fraction", "planned_epochs", "members_planned_epochs", "reward"]
MEMBER_SEP = ";"
GROUPS_FILE, SUMMARY_FILE, FIGURE_FILE = "groups.csv", "summary.json", "groups.png"
RATE_TOL = 1e-9


def directory(results: Path) -> Path:
    """Where the group stage writes its record under paths.results."""
    return results / "group"


@dataclass(frozen=True)
class FusedGroup:
    """One FAT run: its members' maps and the map it trains on (a lone chip's own, or the
    group's fused map), with the epochs the plan gives that map."""

    group_id: str
    members: tuple[FaultMap, ...]
    fault_map: FaultMap
    planned_epochs: float

    @property
    def shared(self) -> bool:
        """Two or more chips on one run (an eFAT group)."""
        return len(self.members) > 1


def table(groups: Sequence[Group], pruned_fraction: Callable[[np.ndarray], float]
          ) -> pd.DataFrame:
    """groups.csv's rows from the formed groups; `pruned_fraction(fused map)` of the model."""
    return pd.DataFrame([(g.group_id, MEMBER_SEP.join(g.members), len(g.members), g.fault_rate,
                          pruned_fraction(g.fused), g.planned_epochs, g.members_planned,
                          g.reward) for g in groups], columns=GROUP_COLUMNS)


def write(out_dir: Path, table: pd.DataFrame, summary: dict[str, Any],
          draw: Callable[[Path], Any] | None = None) -> None:
    """groups.csv (members joined by MEMBER_SEP), the figure and summary.json (with the other
    files' sha256), replacing the old record at once."""
    with sets.record_dir(out_dir, "group", GROUPS_FILE, SUMMARY_FILE, FIGURE_FILE) as tmp:
        atomic.write_csv(table[GROUP_COLUMNS], tmp / GROUPS_FILE)
        if draw is not None:
            draw(tmp / FIGURE_FILE)
        atomic.write_json(tmp / SUMMARY_FILE,
                          {**summary, sets.FILES_KEY: sets.digests(tmp, GROUPS_FILE, FIGURE_FILE)})


def read_table(path: Path) -> pd.DataFrame:
    """groups.csv as the group stage writes it (members as a list of chip ids)."""
    if not path.is_file():
        raise DataError(f"{path}: no groups; run `reduce-ops group` first")
    try:
        groups = pd.read_csv(path, dtype={"group_id": str, "members": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable groups ({exc})") from None
    missing = [c for c in GROUP_COLUMNS if c not in groups.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    groups["members"] = groups["members"].str.split(MEMBER_SEP)
    return groups


def read(group_dir: Path, plan: Plan, fleet: Sequence[FaultMap]) -> list[FusedGroup]:
    """Every FAT run of the record, fused maps rebuilt from `fleet`; one line naming the folder
    when the record was made for another plan, does not hold exactly the chips the plan trains,
    or a fused map differs from the one recorded."""
    summary_path = group_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise DataError(f"{summary_path}: no groups; run `reduce-ops group` first")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{summary_path}: unreadable ({type(exc).__name__}); run "
                        f"`reduce-ops group` again") from None
    if not isinstance(summary, dict):
        raise DataError(f"{summary_path}: not a groups summary; run `reduce-ops group` again")
    sets.check(group_dir, summary, SUMMARY_FILE, "group")
    table = read_table(group_dir / GROUPS_FILE)
    if summary.get("plan_run_id") != plan.run_id:
        raise DataError(f"{group_dir}: the groups were formed for plan "
                        f"{summary.get('plan_run_id')}, not the current plan {plan.run_id}; "
                        f"run `reduce-ops group` again")
    trained = set(plan.chips.loc[plan.chips["feasible"], "chip_id"])
    grouped = [c for members in table["members"] for c in members]
    if sorted(grouped) != sorted(trained):
        raise DataError(f"{group_dir / GROUPS_FILE} does not hold exactly the chips the plan "
                        f"trains; run `reduce-ops group` again")
    maps = {m.chip_id: m for m in fleet}
    strangers = sorted({c for c in grouped if c not in maps})
    if strangers:
        raise DataError(f"{group_dir / GROUPS_FILE}: chips not in the fleet "
                        f"({', '.join(strangers[:3])}); run `reduce-ops group` again")
    out = []
    for row in table.itertuples(index=False):
        members = tuple(maps[c] for c in row.members)
        if len(members) == 1:
            fault_map = members[0]
        else:
            fault_map = FaultMap(row.group_id, fuse(members), "fused")
        if abs(fault_map.fault_rate - float(row.fused_fault_rate)) > RATE_TOL:
            raise DataError(f"{group_dir / GROUPS_FILE}: {row.group_id} was formed for fault "
                            f"rate {float(row.fused_fault_rate):g}, its members' maps give "
                            f"{fault_map.fault_rate:g}; run `reduce-ops group` again")
        out.append(FusedGroup(row.group_id, members, fault_map, float(row.planned_epochs)))
    return out
