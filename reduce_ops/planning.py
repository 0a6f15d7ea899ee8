"""Step 2 of Reduce, arithmetic only: one need per fault rate from its repetitions, the monotone
curve over fault rates, every chip's planned epochs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from reduce_ops.errors import ConfigError, DataError
from reduce_ops.hardware import FaultMap
from reduce_ops.needs import DECISION_METRIC, isotonic, trial_needs
from reduce_ops.records.plan import PLAN_COLUMNS
from reduce_ops.shipping import ShippingRule
from reduce_ops.statistic import parse_statistic

NEED_COLUMNS = ["fault_rate", "needed", "n_reps", "n_never", "reach_fraction", "reach_fitted",
                "reached_need"]


def aggregate_needs(needs_df: pd.DataFrame, statistic="max",
                    min_reached: float = 1.0) -> pd.DataFrame:
    """One need per fault rate from its repetitions (a repetition that never reached the level
    within the budget cap counts as inf).

    Which rates are feasible is decided on the fraction of repetitions that reached: fit
    non-increasing in the fault rate (isotonic), so one unlucky repetition at one rate is pooled
    with its neighbours instead of cutting the feasible region there; a rate is feasible when the
    fitted fraction is at least `min_reached` (1.0: every repetition, the worst case). The need
    of a feasible rate is `statistic` over the repetitions that reached: 'max' (the worst of
    them), 'mean', or a quantile (numpy's method 'higher', never interpolated down);
    `reached_need` is that statistic at every rate, planned or not (inf where none reached).
    """
    stat = parse_statistic(statistic)
    missing = [c for c in ("fault_rate", "needed") if c not in needs_df.columns]
    if missing:
        raise DataError(f"trial needs: missing column(s) {', '.join(missing)}")
    if not 0 < min_reached <= 1:
        raise ConfigError(f"plan.min_reached: expected a fraction in (0, 1], got {min_reached!r}")
    rates, values, sizes, nevers = [], [], [], []
    for rate, g in needs_df.groupby("fault_rate", sort=True):
        v = g["needed"].to_numpy(dtype=float)
        ok = v[np.isfinite(v)]
        if ok.size == 0:
            value = math.inf
        elif stat == "max":
            value = ok.max()
        elif stat == "mean":
            value = ok.mean()
        else:
            value = np.quantile(ok, stat, method="higher")
        rates.append(float(rate))
        values.append(float(value))
        sizes.append(v.size)
        nevers.append(int(v.size - ok.size))
    reach, fitted, needed = feasible_needs(rates, values, sizes, nevers, min_reached)
    return pd.DataFrame(list(zip(rates, needed, sizes, nevers, reach, fitted, values)),
                        columns=NEED_COLUMNS)


def feasible_needs(rates: Sequence[float], values: Sequence[float], sizes: Sequence[int],
                   nevers: Sequence[int], min_reached: float,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reach fraction, its non-increasing fit, the need or inf) at each rate (ascending), from
    each rate's need statistic over the repetitions that reached (`values`), its repetitions
    (`sizes`) and those that never reached (`nevers`): feasible where the fit is at least
    `min_reached` (see aggregate_needs)."""
    reach = 1.0 - np.asarray(nevers, dtype=float) / np.asarray(sizes, dtype=float)
    fitted = (isotonic(np.asarray(rates, dtype=float), reach, increasing=False)
              if len(rates) > 1 else reach)
    needed = np.where(fitted >= min_reached - 1e-9, np.asarray(values, dtype=float), math.inf)
    return reach, fitted, needed


@dataclass(frozen=True, eq=False)
class MonotoneCurve:
    """Retraining need as a non-decreasing function of the fault rate, inf where infeasible.

    `fitted` is the upper monotone envelope of the measured needs (their running maximum), so at
    every measured rate the curve is at least what the statistic says there; between measured
    rates it is linear. The feasible region runs from the lowest measured rate up to
    `max_feasible_rate`: from `fit_monotone_curve`, the highest measured rate such that it and
    every lower measured rate have a finite need; everything above is infeasible, including
    finite measurements above an infinite one (no evidence that they are reachable). With no
    feasible point `max_feasible_rate` is -inf. `fit_plan_curve` may move the edge part of the
    way to the next measured rate (then `fitted` has one more point, the need there).
    """

    rates: np.ndarray  # measured fault rates, sorted, shape (n,)
    needed: np.ndarray  # measured aggregate needs in epochs, inf = never reached, shape (n,)
    fitted: np.ndarray  # non-decreasing need on rates[:fitted.size], nowhere below `needed`
    max_feasible_rate: float
    max_amount: float  # the most retraining measured (the budget cap), epochs

    def __call__(self, rate) -> np.ndarray:
        """Need in epochs at each fault rate; inf above `max_feasible_rate`."""
        r = np.asarray(rate, dtype=float)
        out = np.full(r.shape, math.inf)
        n = self.fitted.size
        if n == 0:
            return out
        inside = r <= self.max_feasible_rate
        # below the lowest measured rate: the value there; np.interp is linear in between
        out[inside] = np.interp(r[inside], self.rates[:n], self.fitted)
        out[np.isnan(r)] = math.nan
        return out


def fit_monotone_curve(rates, needed, max_amount: float) -> MonotoneCurve:
    """The smallest non-decreasing need-vs-fault-rate curve that is nowhere below the measured
    needs (their running maximum), linear between measured rates."""
    x = np.asarray(rates, dtype=float).ravel()
    y = np.asarray(needed, dtype=float).ravel()
    if x.shape != y.shape:
        raise DataError(f"monotone fit: {x.size} fault rates but {y.size} needs")
    if np.isnan(x).any() or np.isnan(y).any():
        raise DataError("monotone fit: fault rates and needs must not be NaN")
    if np.unique(x).size != x.size:
        raise DataError("monotone fit: fault rates must be unique (aggregate repetitions first)")
    if not (math.isfinite(max_amount) and max_amount >= 0):
        raise DataError(f"monotone fit: max_amount must be finite and >= 0, got {max_amount!r}")
    order = np.argsort(x)
    x, y = x[order], y[order]
    finite = np.isfinite(y)
    n_feasible = x.size if finite.all() else int(np.argmin(finite))  # stop at the first inf
    fitted = np.maximum.accumulate(np.maximum(y[:n_feasible], 0.0))
    max_rate = float(x[n_feasible - 1]) if n_feasible else -math.inf
    return MonotoneCurve(x, y, fitted, max_rate, float(max_amount))


def fit_plan_curve(points: pd.DataFrame, max_amount: float,
                   min_reached: float = 1.0) -> MonotoneCurve:
    """The plan's curve from `aggregate_needs` output: the monotone fit over the planned rates,
    its feasible edge then interpolated in the reach fraction.

    Between the last planned rate (fitted reach fraction >= `min_reached`) and the next
    measured one (below it), the reach fraction is taken as linear, like the need: the feasible
    region ends where it crosses `min_reached`, and the need up to there is linear between the
    two rates' statistics over the repetitions that reached (the next one's never below the
    last's). The edge stays at the last planned rate where no repetition of the next rate
    reached within the cap, and with `min_reached` 1.0 (the worst case: every repetition).
    """
    missing = [c for c in ("fault_rate", "needed", "reach_fitted", "reached_need")
               if c not in points.columns]
    if missing:
        raise DataError(f"aggregate needs: missing column(s) {', '.join(missing)}; "
                        "run `reduce-ops plan` again")
    p = points.sort_values("fault_rate")
    curve = fit_monotone_curve(p["fault_rate"], p["needed"], max_amount)
    rates, reach = p["fault_rate"].to_numpy(float), p["reach_fitted"].to_numpy(float)
    reached = p["reached_need"].to_numpy(float)
    k = curve.fitted.size                   # the first rate the plan leaves out
    if not (0 < k < rates.size and math.isfinite(reached[k])
            and reach[k] < min_reached - 1e-9 < reach[k - 1]):
        return curve
    edge = rates[k - 1] + (rates[k] - rates[k - 1]) * (reach[k - 1] - min_reached) / (
        reach[k - 1] - reach[k])
    if edge <= rates[k - 1]:
        return curve
    fitted = np.append(curve.fitted, max(curve.fitted[-1], min(reached[k], max_amount)))
    return MonotoneCurve(curve.rates, curve.needed, fitted, float(edge), curve.max_amount)


@dataclass(frozen=True)
class ChipPlan:
    """One chip's planned retraining: epochs to run, or infeasible with the reason."""

    chip_id: str
    fault_rate: float
    needed: float  # epochs read off the curve, inf when infeasible
    planned_epochs: float  # rounded up to the granularity, NaN when infeasible
    feasible: bool
    reason: str


def _check_plan_params(granularity: float, safety_margin: float) -> None:
    """Fail with one line naming the config key when the rounding parameters are unusable."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(granularity) and granularity > 0):
        raise ConfigError(f"resilience.checkpoint_every: expected a number of epochs > 0, "
                          f"got {granularity!r}")
    if not (number(safety_margin) and safety_margin >= 1):
        raise ConfigError(f"plan.safety_margin: expected a number >= 1, got {safety_margin!r}")


def _reason(curve: MonotoneCurve, rate: float, needed: float, planned: float, raw: float) -> str:
    """Human-readable note for one chip's plan (empty when nothing is worth saying)."""
    if not math.isfinite(needed):
        if curve.fitted.size == 0:
            return "no measured fault rate reaches the accuracy level within the budget cap"
        return (f"fault rate {rate:.4g} above the highest rate reachable within the budget cap "
                f"({curve.max_feasible_rate:g})")
    if planned == 0:
        return "no retraining needed"
    if raw > planned:
        return f"capped at the budget cap {curve.max_amount:g} epochs"
    return ""


def _rounded(needed: np.ndarray, granularity: float, safety_margin: float) -> np.ndarray:
    """Need times the margin, rounded up to the granularity (inf stays inf)."""
    with np.errstate(invalid="ignore"):
        steps = np.ceil(needed * safety_margin / granularity - 1e-9)
        return np.round(np.maximum(steps, 0.0) * granularity, 12) + 0.0  # no -0.0


def planned_epochs(curve: MonotoneCurve, rates, granularity: float,
                   safety_margin: float = 1.0) -> np.ndarray:
    """What the plan gives a fault map of each fault rate: epochs, or inf where infeasible
    (what `plan_fleet` plans a chip, and what eFAT plans a fused map)."""
    _check_plan_params(granularity, safety_margin)
    needed = curve(np.asarray(rates, dtype=float))
    raw = _rounded(needed, granularity, safety_margin)
    return np.where(np.isfinite(needed), np.minimum(raw, curve.max_amount), math.inf)


def plan_fleet(
    curve: MonotoneCurve, chips: pd.DataFrame, granularity: float, safety_margin: float = 1.0
) -> pd.DataFrame:
    """Per-chip retraining: need off the curve, times the margin, rounded up to the granularity.

    The result is capped at `curve.max_amount`: every feasible need is at most that amount, which
    the measurement showed to be enough. Columns: chip_id, fault_rate, needed, planned_epochs,
    feasible, reason.
    """
    _check_plan_params(granularity, safety_margin)
    missing = [c for c in ("chip_id", "fault_rate") if c not in chips.columns]
    if missing:
        raise DataError(f"fleet table: missing column(s) {', '.join(missing)}")
    if chips["chip_id"].duplicated().any():
        dup = chips.loc[chips["chip_id"].duplicated(), "chip_id"].iloc[0]
        raise DataError(f"fleet table: duplicate chip_id {dup!r}")
    rates = chips["fault_rate"].to_numpy(dtype=float)
    if np.isnan(rates).any():
        raise DataError("fleet table: fault_rate must not be missing")
    needed = curve(rates)
    feasible = np.isfinite(needed)
    raw = _rounded(needed, granularity, safety_margin)
    planned = np.where(feasible, np.minimum(raw, curve.max_amount), np.nan)
    plans = [
        ChipPlan(cid, float(r), float(n), float(p), bool(f), _reason(curve, r, n, p, w))
        for cid, r, n, p, f, w in zip(chips["chip_id"], rates, needed, planned, feasible, raw)
    ]
    return pd.DataFrame([asdict(p) for p in plans], columns=PLAN_COLUMNS)


@dataclass(frozen=True, eq=False)
class PlanResult:
    """Everything Step 2 produces: per-rate points, the fitted curve, the per-chip plan."""

    level: float
    points: pd.DataFrame  # fault_rate, needed (aggregate), n_reps, n_never, min, max
    curve: MonotoneCurve
    plan: pd.DataFrame  # PLAN_COLUMNS


def make_plan(trials: pd.DataFrame, chips: pd.DataFrame, level: float, statistic,
              granularity: float, safety_margin: float, cap: float,
              min_reached: float = 1.0, metric: str = DECISION_METRIC,
              fleet_budget: float | None = None) -> PlanResult:
    """Trials (from MLflow or the CSV) + fleet -> the per-chip plan for `metric` (validation
    accuracy, or what a guard band leaves of it) at `level` (what verification checks) within
    the budget cap (epochs per chip)."""
    needs = trial_needs(trials, level, metric)
    needs.loc[needs["needed"] > cap + 1e-9, "needed"] = math.inf    # beyond the budget
    points = aggregate_needs(needs, statistic, min_reached)
    spread = needs.groupby("fault_rate")["needed"].agg(["min", "max"]).reset_index()
    points = points.merge(spread, on="fault_rate", how="left")
    curve = fit_plan_curve(points, cap, min_reached)
    plan = spend_spare_budget(plan_fleet(curve, chips, granularity, safety_margin), points,
                              cap, fleet_budget)
    return PlanResult(float(level), points, curve, plan)


def spend_spare_budget(plan: pd.DataFrame, points: pd.DataFrame, cap: float,
                       fleet_budget: float | None) -> pd.DataFrame:
    """Chips beyond the plan's edge, trained to the cap on what the plan leaves of
    `fleet_budget` (epochs per chip, on average over the fleet): lowest fault rate first, while
    the plan's total stays within the budget, and only where some repetition reached the level
    within the cap (below the first measured rate above the last such rate where none did, the
    reach fraction being linear between measured rates). Verification then decides each of them
    like any chip. The plan of every chip within the edge is kept as it is (None: no budget,
    every chip beyond the edge is rejected untrained)."""
    if fleet_budget is None or plan.empty:
        return plan
    if fleet_budget < 0:
        raise ConfigError(f"plan.fleet_budget: expected epochs per chip >= 0 or null, got "
                          f"{fleet_budget!r}")
    rates = points["fault_rate"].to_numpy(dtype=float)
    reached = rates[points["reach_fraction"].to_numpy(dtype=float) > 0]
    if reached.size == 0:                       # nothing to try (the reason says why)
        return plan
    above = rates[rates > reached.max()]      # the reach fraction, linear between the measured
    # rates, is above zero up to (not at) the next rate where none reached
    tried = (plan["fault_rate"] < above.min()) if above.size else (
        plan["fault_rate"] <= reached.max() + 1e-12)
    plan = plan.copy()
    spare = fleet_budget * len(plan) - float(plan.loc[plan["feasible"], "planned_epochs"].sum())
    beyond = plan[~plan["feasible"] & tried]
    for i in plan[~plan["feasible"] & ~tried].index:
        plan.at[i, "reason"] += ("; no resilience repetition reached the level near this rate, "
                                 "so the spare budget does not try it")
    for i in beyond.sort_values(["fault_rate", "chip_id"]).index:
        if cap > spare + 1e-9:
            plan.at[i, "reason"] += (f"; no room left in plan.fleet_budget ({fleet_budget:g} "
                                     f"epochs per chip) after the chips within the edge and "
                                     f"those beyond it of lower fault rate")
            continue
        spare -= cap
        reason = (f"{BEYOND_EDGE}: fault rate {plan.at[i, 'fault_rate']:.4g} above the plan's "
                  f"edge, trained to the budget cap on the fleet's spare budget "
                  f"({fleet_budget:g} epochs per chip)")
        plan.loc[i, ["planned_epochs", "feasible", "reason"]] = [cap, True, reason]
    return plan


BEYOND_EDGE = "beyond the edge"     # how a plan's reason starts for a chip spend_spare_budget took


def on_spare_budget(plan: pd.DataFrame) -> np.ndarray:
    """Per chip of a plan table: taken beyond the edge by spend_spare_budget (False for a plan
    without reasons)."""
    if "reason" not in plan.columns:
        return np.zeros(len(plan), dtype=bool)
    return plan["reason"].astype(str).str.startswith(BEYOND_EDGE).to_numpy()


def plan_for_rule(trials: pd.DataFrame, fleet: Sequence[FaultMap], rule: ShippingRule,
                  statistic, granularity: float, safety_margin: float,
                  min_reached: float, fleet_budget: float | None = None) -> PlanResult:
    """The plan that gives each chip of `fleet` what it needs to pass `rule` (validation
    accuracy at least its ship level) within its cap, and chips beyond the edge the cap while
    `fleet_budget` allows (see spend_spare_budget)."""
    chips = pd.DataFrame({"chip_id": [m.chip_id for m in fleet],
                          "fault_rate": [m.fault_rate for m in fleet]})
    if not rule.escape_rate and rule.pool <= 1:
        return make_plan(trials, chips, rule.ship_level, statistic, granularity, safety_margin,
                         rule.cap, min_reached, fleet_budget=fleet_budget)
    return make_plan(with_decision_column(trials, rule), chips, rule.ship_level, statistic,
                     granularity, safety_margin, rule.cap, min_reached, metric=DECIDED_METRIC,
                     fleet_budget=fleet_budget)


DECIDED_METRIC = "val_decided"     # what the shipping rule reads at each trial checkpoint


def with_decision_column(trials: pd.DataFrame, rule: ShippingRule) -> pd.DataFrame:
    """The trials with what the rule compares with its ship level at each checkpoint: the
    validation accuracy less its guard band, pooled along each trial like the checks of a
    chip."""
    if (trials[["val_lost", "val_gained"]] < 0).any().any():
        raise DataError("trials table: no val_lost / val_gained (measured before guard bands "
                        "were); run `reduce-ops resilience` again")
    t = trials.sort_values(["fault_rate", "repetition", "amount"]).copy()
    t[DECIDED_METRIC] = t["val_accuracy"] - rule.bands(t["val_accuracy"], t["val_lost"],
                                                       t["val_gained"], rule.n_decision)
    t[DECIDED_METRIC] = t.groupby(["fault_rate", "repetition"])[DECIDED_METRIC].transform(
        lambda x: rule.pooled_curve(x.to_numpy()))
    return t
