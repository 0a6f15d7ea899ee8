"""What a person browsing the MLflow UI reads on `fat`'s runs: the run's name carries the
verdict (shipped, rejected, a group that missed), the description says what happened and links
the model and the runs it relates to, and tags let a search find each kind."""

from __future__ import annotations

import math
from collections.abc import Sequence

from reduce_ops import names
from reduce_ops.names import MISSED, REJECTED, SHIPPED, registered_name
from reduce_ops.records.chips import ChipOutcome
from reduce_ops.reports.common import md_table
from reduce_ops.retraining.units import ChipJob, Unit
from reduce_ops.retraining.worker import Trained
from reduce_ops.tracking import layout


def verdict(unit: Unit, t: Trained) -> str:
    """shipped; rejected (a chip that missed at the cap); missed (a group that did: its chips
    then train on their own)."""
    if t.check.passed:
        return SHIPPED
    return MISSED if unit.group_id else REJECTED


def _what(unit: Unit) -> str:
    return unit.group_id or unit.members[0].chip_id


def unit_run_name(unit: Unit, t: Trained) -> str:
    """e.g. 'chip-006 (shipped)', 'chip-003 (rejected at cap)', 'group-001 (missed at cap)'."""
    v = verdict(unit, t)
    return f"{_what(unit)} ({v}{'' if v == SHIPPED else ' at cap'})"


def model_name(unit: Unit) -> str:
    """The logged model's name on the experiment's Models page: its chip or group."""
    return _what(unit)


def unit_tags(unit: Unit, t: Trained) -> dict[str, str]:
    return {names.TAG_VERDICT: verdict(unit, t), names.TAG_TRAINED: "true"}


def _checked(unit: Unit, t: Trained, reason: str) -> str:
    last = t.check.checks[-1][1].accuracy if t.check.checks else t.val_accuracy
    how = (f"{t.check.epochs:g} epochs of FAT (planned {unit.planned_epochs:g}, "
           f"{len(t.check.checks)} validation check{'s' * (len(t.check.checks) != 1)})")
    if t.check.passed:
        return f"passed verification at validation accuracy {last:.4f} after {how}"
    return f"missed verification after {how}: {reason}"


def chip_description(unit: Unit, t: Trained, reason: str, version_link: str,
                     version: str, registered: str, failed_group: str = "") -> str:
    """A chip trained on its own: verdict, how it was checked, its registered version."""
    job = unit.members[0]
    head = (f"**Shipped**: chip {job.chip_id} (fault rate {job.fault_rate:.4f}) "
            if t.check.passed else f"**Rejected**: chip {job.chip_id} (fault rate "
                                   f"{job.fault_rate:.4f}) ")
    model = (f"Its model: [{registered} version {version}]({version_link})"
             + (" (champion)." if t.check.passed else ", not champion: it does not ship."))
    after = (f"\n\nIt trained on its own after its eFAT group {failed_group} missed at the cap."
             if failed_group else "")
    return (f"{head}{_checked(unit, t, reason)}; test accuracy {t.test_accuracy:.4f} "
            f"(reported only).\n\n{model}{after}")


def group_description(unit: Unit, t: Trained, reason: str,
                      members: Sequence[tuple[str, str, str]] = ()) -> str:
    """An eFAT group's run: verdict; for a shipped group, its members' runs and versions
    (`members`: chip id, run link, version link); for a missed one, what happens instead."""
    ids = ", ".join(j.chip_id for j in unit.members)
    head = (f"eFAT group {unit.group_id}: one FAT run on the fused fault map of "
            f"{len(unit.members)} chips ({ids}), fused fault rate "
            f"{unit.fault_map.fault_rate:.4f}.")
    if not t.check.passed:
        return (f"**Missed at the budget cap**: {head} It {_checked(unit, t, reason)}.\n\n"
                f"Its model ships with no chip and was not logged; its chips train on their "
                f"own (their runs are in this experiment).")
    rows = [(f"[{chip}]({run})", f"[version]({version})") for chip, run, version in members]
    return (f"**Shipped** for its chips: {head} It {_checked(unit, t, reason)}; test accuracy "
            f"{t.test_accuracy:.4f} (reported only).\n\n"
            + md_table(("chip run", "registered model"), rows))


def version_description(unit: Unit, t: Trained, run_link: str, model_link: str) -> str:
    """A registered version's description: the run that trained it, and its logged model."""
    run = f"[{unit_run_name(unit, t)}]({run_link})"
    model = f"[{model_name(unit)}]({model_link})" if model_link else model_name(unit)
    what = (f"the FAT run of eFAT group {unit.group_id} (one model for its "
            f"{len(unit.members)} chips)" if unit.group_id else "its own FAT run")
    return f"Trained by {what}, run {run}; logged model {model}."


def member_run_name(job: ChipJob, unit: Unit) -> str:
    """e.g. 'chip-002 (shipped, group-000)'."""
    return f"{job.chip_id} ({SHIPPED}, {unit.group_id})"


def member_description(job: ChipJob, unit: Unit, group_link: str, version_link: str,
                       version: str, registered: str) -> str:
    return (f"**Shipped** with the model of eFAT group [{unit.group_id}]({group_link}), "
            f"trained once for its {len(unit.members)} chips on their fused fault map (fault "
            f"rate {unit.fault_map.fault_rate:.4f}; this chip's own: {job.fault_rate:.4f}). "
            f"Not trained on its own: the times of this run are the group's.\n\n"
            f"Its model: [{registered} version {version}]({version_link}) (champion).")


def rejected_run_name(job: ChipJob) -> str:
    """e.g. 'chip-004 (rejected by plan)'."""
    return f"{job.chip_id} ({REJECTED} by plan)"


def rejected_description(job: ChipJob, reason: str) -> str:
    return (f"**Rejected by the plan, not trained** ({reason}). No model was trained or "
            f"registered for chip {job.chip_id}.")


def fleet_description(outcomes: Sequence[ChipOutcome], experiment_id: str,
                      prefix: str) -> str:
    """The `fat` stage run's description: how many chips shipped, and one row per chip with
    its verdict, linking its run (in `experiment_id`) and its registered version."""
    by_plan = sum(o.status == REJECTED and math.isnan(o.planned_epochs) for o in outcomes)
    shipped = sum(o.status == SHIPPED for o in outcomes)
    rows = []
    for o in outcomes:
        how = ("rejected by plan" if o.status == REJECTED and math.isnan(o.planned_epochs)
               else o.status if o.status == SHIPPED else "rejected at cap")
        link = layout.model_version_link(registered_name(prefix, o.chip_id), o.model_version)
        version = f"[v{o.model_version}]({link})" if o.model_version else "-"
        epochs = "-" if math.isnan(o.planned_epochs) else f"{o.actual_epochs:g}"
        test = "-" if math.isnan(o.test_accuracy) else f"{o.test_accuracy:.4f}"
        run = (f"[{o.chip_id}]({layout.run_link(experiment_id, o.run_id)})" if o.run_id
               else o.chip_id)
        rows.append([run, how, f"{o.fault_rate:.4f}", o.group_id or "-", epochs, test, version])
    return (f"**Shipped {shipped} of {len(outcomes)} chips**; {by_plan} rejected by the plan, "
            f"{len(outcomes) - shipped - by_plan} at the budget cap.\n\n"
            + md_table(["chip", "verdict", "fault rate", "eFAT group", "epochs", "test accuracy",
                        "model"], rows, limit=60, more="chips.csv"))
