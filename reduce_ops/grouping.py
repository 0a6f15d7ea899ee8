"""eFAT: fuse similar chips' fault maps so that one fault-aware retraining serves a group.

A group's fused fault map is the union of its members' faulty PEs. A model trained with the fused
map's weights held at zero has zero weight on every member's faulty PEs (each member's set is a
subset), so it is a valid model for every member. Fusing raises the fault rate, so the group
needs at least what its hardest member needs; the plan's curve says how much at the fused rate.
The reward of a grouping is the retraining it saves: the members' own planned epochs minus the
group's.

Grouping is a greedy merge on exact rewards, made to scale to a fab's fleet:
1. candidate partners: every chip's `candidates` best partners by the reward of merging the two,
   estimated from the overlap of their maps on `sample_pes` sampled PEs (one matrix product);
2. greedy merge: repeatedly merge the two groups whose merge saves the most epochs, computed on
   the exact fused maps (bit-packed OR + popcount), while a merge saves something, the merged
   group stays within `max_size` and within the feasible region of the plan;
3. refinement: a merge is never undone, so a chip merged early can sit in the wrong group. Each
   chip in turn moves to another group (any group on fleets of up to 1,000 chips, else those of
   its candidate partners) or out on its own where that saves the most epochs, exactly computed,
   until no move saves anything (`refine_rounds` passes at most).
Chips the plan rejects, and chips that need no retraining, stay out of every group.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reduce_ops.errors import ConfigError
from reduce_ops.hardware import FaultMap
from reduce_ops.planning import MonotoneCurve, fit_monotone_curve, planned_epochs

CHUNK = 1024        # rows of the candidate search at a time
EVERY_GROUP = 1000  # refinement tries every group for each chip up to this many chips, beyond it
                    # the groups of the chip's candidate partners


@dataclass(frozen=True)
class Group:
    """Chips that share one FAT run, and what the run is planned for."""

    group_id: str
    members: tuple[str, ...]
    fused: np.ndarray               # bool [rows, cols], the union of the members' faulty PEs
    planned_epochs: float           # the plan's epochs at the fused fault rate
    members_planned: float          # the members' own planned epochs, summed

    @property
    def fault_rate(self) -> float:
        return float(np.count_nonzero(self.fused)) / self.fused.size

    @property
    def reward(self) -> float:
        """Epochs saved: the members' own plans minus the group's."""
        return self.members_planned - self.planned_epochs


Rates = Callable[[np.ndarray], np.ndarray]


def fused_plan(points: pd.DataFrame, budget_cap: float, granularity: float,
               safety_margin: float) -> tuple[MonotoneCurve, Rates, Rates]:
    """What a fused map is planned from the plan's curve_points.csv: the monotone fit over the
    measured planned rates only, short of the plan's interpolated edge (a group that misses at
    the cap costs the cap and then its members alone, and one check ships all of them; chips in
    the edge keep their own plan and train alone). Returns the curve, epochs at fault rates,
    and the chance that a map of each rate misses at the cap: the share of the resilience
    repetitions that never reached (fitted, non-increasing; linear between measured rates)."""
    curve = fit_monotone_curve(points["fault_rate"], points["needed"], budget_cap)
    order = np.argsort(points["fault_rate"].to_numpy(dtype=float))
    rates = points["fault_rate"].to_numpy(dtype=float)[order]
    reach = (points["reach_fitted"].to_numpy(dtype=float)[order] if "reach_fitted" in points
             else np.ones_like(rates))

    def planned_at(r: np.ndarray) -> np.ndarray:
        return planned_epochs(curve, r, granularity, safety_margin)

    def miss_at(r: np.ndarray) -> np.ndarray:
        return 1.0 - np.interp(np.asarray(r, dtype=float), rates, reach)

    return curve, planned_at, miss_at


@dataclass(frozen=True)
class GroupCost:
    """What grouping minimises. Without `miss_at`: the planned epochs of each run. With it: the
    expected epochs, where a run at fault rate u misses at the cap with chance miss(u) (then it
    costs the cap, and a group's members train on their own):
        a chip alone   own + miss(r) * (cap - own)
        a group        P(u) + miss(u) * (cap - P(u) + sum of its members' costs alone)."""

    planned_at: Rates
    miss_at: Rates | None = None
    cap: float = 0.0

    def alone(self, own: np.ndarray, rates: np.ndarray) -> np.ndarray:
        if self.miss_at is None:
            return own
        return own + self.miss_at(rates) * (self.cap - own)

    def group(self, rates: np.ndarray, alone: np.ndarray | float) -> np.ndarray:
        planned = self.planned_at(rates)
        if self.miss_at is None:
            return planned
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(planned),
                            planned + self.miss_at(rates) * (self.cap - planned + alone), np.inf)


def member_share(run_epochs: float, n_members: int) -> float:
    """A member's share of its group's FAT run: one run's epochs count once for all members
    (and a run that missed at the cap costs its members that share on top of their own runs)."""
    return run_epochs / n_members


def fuse(maps: Sequence[FaultMap]) -> np.ndarray:
    """The fused fault map: a PE is faulty when it is faulty on any member (exact union)."""
    if not maps:
        raise ValueError("fuse needs at least one fault map")
    return np.logical_or.reduce([m.faulty for m in maps])


def _packed(faulty: np.ndarray) -> np.ndarray:
    """A bool map as 64-bit words ([rows * cols / 64] uint64, zero-padded)."""
    bits = np.packbits(faulty.ravel())
    bits = np.pad(bits, (0, -len(bits) % 8))
    return bits.view(np.uint64)


class _Merger:
    """Greedy merging on exact rewards; groups are indexed by the chip that founded them."""

    def __init__(self, maps: Sequence[FaultMap], own: np.ndarray, cost: GroupCost,
                 max_size: int) -> None:
        self.n_pes = maps[0].faulty.size
        self.words = np.stack([_packed(m.faulty) for m in maps])            # [n, W] uint64
        self.count = np.bitwise_count(self.words).sum(axis=1).astype(np.int64)  # faulty PEs
        self.own = own                                                       # [n] alone
        self.planned = own.copy()                                            # of each group
        self.alone = own.copy()                  # its members' costs alone, summed
        self.members = [[i] for i in range(len(maps))]
        self.alive = np.ones(len(maps), dtype=bool)
        self.cost = cost
        self.max_size = max_size

    def gains(self, g: int, others: np.ndarray) -> np.ndarray:
        """Exact epochs saved by merging group g with each group in `others`."""
        union = np.bitwise_count(self.words[others] | self.words[g]).sum(axis=1)
        after = self.cost.group(union / self.n_pes, self.alone[g] + self.alone[others])
        gain = self.planned[g] + self.planned[others] - after
        too_big = np.array([len(self.members[g]) + len(self.members[o]) > self.max_size
                            for o in others], dtype=bool)
        gain[too_big | ~np.isfinite(after)] = -math.inf
        return gain

    def merge(self, g: int, h: int) -> int:
        self.words[g] |= self.words[h]
        self.alone[g] += self.alone[h]
        self.planned[g] = float(self.cost.group(
            np.array([np.bitwise_count(self.words[g]).sum() / self.n_pes]), self.alone[g])[0])
        self.members[g] += self.members[h]
        self.members[h] = []
        self.alive[h] = False
        return g


def candidate_partners(maps: Sequence[FaultMap], own: np.ndarray, cost: GroupCost,
                       n_candidates: int, sample_pes: int, seed: int = 0) -> list[np.ndarray]:
    """For each chip, up to `n_candidates` partners whose merge with it saves the most epochs
    (a saving may be zero or negative: a chip may still fit an existing group of a partner),
    estimated from the maps' overlap on `sample_pes` uniformly sampled PEs: one product of the
    [chips, sample] 0/1 matrix with its transpose, no loop over pairs. Feasible merges only."""
    n = len(maps)
    n_pes = maps[0].faulty.size
    pes = np.random.default_rng(seed).choice(n_pes, size=min(sample_pes, n_pes), replace=False)
    x = np.stack([m.faulty.ravel()[pes] for m in maps]).astype(np.float32)   # [n, S]
    count = np.array([np.count_nonzero(m.faulty) for m in maps], dtype=np.float64)
    k = min(n_candidates, n - 1)
    out = []
    for start in range(0, n, CHUNK):          # CHUNK rows at a time: memory O(CHUNK * n)
        rows = np.arange(start, min(start + CHUNK, n))
        both = (x[rows] @ x.T) * (n_pes / len(pes))                          # est. |a ∩ b|
        union = np.maximum(count[rows, None] + count[None, :] - both,
                           np.maximum.outer(count[rows], count))
        both_alone = own[rows, None] + own[None, :]
        gain = both_alone - cost.group(union / n_pes, both_alone)            # [chunk, n]
        gain[np.arange(len(rows)), rows] = -np.inf
        gain[~np.isfinite(gain)] = -np.inf
        if k <= 0:
            out += [np.empty(0, dtype=np.int64)] * len(rows)
            continue
        best = np.argpartition(-gain, k - 1, axis=1)[:, :k]                   # [chunk, k]
        out += [row[np.isfinite(gain[i, row])] for i, row in enumerate(best)]
    return out


def refine(chip_words: np.ndarray, own: np.ndarray, groups: list[list[int]],
           cost: GroupCost, max_size: int,
           partners: Sequence[np.ndarray], n_pes: int, rounds: int) -> list[list[int]]:
    """Single-chip moves between groups, each taken only when it lowers the total cost (`own`:
    each chip's cost alone; exact, on the bit-packed maps): to another group (any group up to
    EVERY_GROUP chips, else one holding a candidate partner of the chip), or out on its own.
    Returns the groups (lists of chip indices), none empty."""
    n = len(own)
    members: list[list[int]] = [list(g) for g in groups] + [[] for _ in range(n)]
    words = np.zeros((len(members), chip_words.shape[1]), dtype=np.uint64)
    planned = np.zeros(len(members))
    alone = np.zeros(len(members))                 # each group's members' costs alone, summed
    where = np.empty(n, dtype=np.int64)
    free = list(range(len(members) - 1, len(groups) - 1, -1))   # empty slots, popped from the end

    def cost_of(chips: list[int], fused: np.ndarray) -> float:
        if len(chips) == 1:
            return float(own[chips[0]])
        return float(cost.group(np.array([np.bitwise_count(fused).sum() / n_pes]),
                                own[chips].sum())[0])

    def fused_of(chips: list[int]) -> np.ndarray:
        return np.bitwise_or.reduce(chip_words[chips], axis=0)

    everywhere = n <= EVERY_GROUP
    for k, g in enumerate(groups):
        words[k] = fused_of(g)
        planned[k] = cost_of(g, words[k])
        alone[k] = own[g].sum()
        where[g] = k
    for _ in range(rounds):
        moved = 0
        for i in range(n):
            g = int(where[i])
            rest = [j for j in members[g] if j != i]
            rest_words = fused_of(rest) if rest else None
            rest_cost = cost_of(rest, rest_words) if rest else 0.0
            if everywhere:
                targets = np.flatnonzero([bool(m) for m in members])
            else:
                targets = np.unique(where[partners[i]]) if len(partners[i]) else where[:0]
            targets = np.array([h for h in targets
                                if h != g and len(members[h]) < max_size], dtype=np.int64)
            best, to = -1e-9, None
            if targets.size:
                union = np.bitwise_count(words[targets] | chip_words[i]).sum(axis=1)
                delta = (rest_cost + cost.group(union / n_pes, alone[targets] + own[i])
                         - planned[g] - planned[targets])
                delta[~np.isfinite(delta)] = math.inf
                k = int(np.argmin(delta))
                if delta[k] < best:
                    best, to = float(delta[k]), int(targets[k])
            if rest and rest_cost + own[i] - planned[g] < best:
                to = free.pop()
            if to is None:
                continue
            members[g] = rest
            words[g] = rest_words if rest else 0
            planned[g] = rest_cost
            alone[g] -= own[i]
            if not rest:
                free.append(g)
            members[to] = members[to] + [i]
            words[to] = words[to] | chip_words[i]
            planned[to] = cost_of(members[to], words[to])
            alone[to] += own[i]
            where[i] = to
            moved += 1
        if not moved:
            break
    return [m for m in members if m]


def form_groups(maps: Sequence[FaultMap], own_planned: Sequence[float],
                planned_at: Rates, max_size: int,
                n_candidates: int = 16, sample_pes: int = 8192, seed: int = 0,
                refine_rounds: int = 10, miss_at: Rates | None = None,
                cap: float = 0.0) -> list[Group]:
    """Greedy reward-driven fusion of the chips in `maps` (all plannable, own planned > 0).

    `planned_at(fault_rates)` gives the plan's epochs at each fault rate (inf where
    infeasible), vectorised. With `miss_at` (the chance a run at each rate misses at the `cap`)
    grouping minimises expected epochs instead of planned ones (`GroupCost`). Every chip ends in
    exactly one group; a group of one is a chip that no merge helped. Groups are ordered by
    their first member's position in `maps`.
    """
    if max_size < 1:
        raise ConfigError(f"group.max_size: must be >= 1, got {max_size}")
    if not maps:
        return []
    planned_own = np.asarray(own_planned, dtype=np.float64)
    cost = GroupCost(planned_at, miss_at, cap)
    own = cost.alone(planned_own, np.array([m.fault_rate for m in maps]))   # what grouping weighs
    merger = _Merger(maps, own, cost, max_size)
    heap: list[tuple[float, int, int]] = []

    def push(g: int, others: np.ndarray) -> None:
        others = np.unique(others[merger.alive[others] & (others != g)])
        if others.size:
            for o, gain in zip(others, merger.gains(g, others)):
                if gain > 1e-9:
                    heapq.heappush(heap, (-float(gain), int(g), int(o)))

    owner = np.arange(len(maps))              # the group each chip is in
    if max_size > 1 and len(maps) > 1:
        partners = candidate_partners(maps, own, cost, n_candidates, sample_pes, seed)
        for i, row in enumerate(partners):
            push(i, row)
        while heap:
            neg, g, h = heapq.heappop(heap)
            if not (merger.alive[g] and merger.alive[h]):
                continue
            gain = merger.gains(g, np.array([h]))[0]
            if gain < -neg - 1e-9:            # out of date: requeue at its current value
                if gain > 1e-9:
                    heapq.heappush(heap, (-float(gain), g, h))
                continue
            merger.merge(g, h)
            owner[owner == h] = g
            # the merged group's candidates: its members' partners, in their current groups
            push(g, owner[np.concatenate([partners[m] for m in merger.members[g]])])
    found = [merger.members[g] for g in np.flatnonzero(merger.alive)]
    if max_size > 1 and len(maps) > 1 and refine_rounds > 0:
        chip_words = np.stack([_packed(m.faulty) for m in maps])
        found = refine(chip_words, own, found, cost, max_size, partners,
                       merger.n_pes, refine_rounds)

    def planned(members: list[int]) -> tuple[np.ndarray, float]:   # fused map, its epochs
        fused = fuse([maps[i] for i in members])
        return fused, (float(planned_own[members[0]]) if len(members) == 1 else
                       float(planned_at(np.array([np.count_nonzero(fused) / fused.size]))[0]))

    kept: dict[tuple[int, ...], tuple[np.ndarray, float]] = {}
    for m in found:
        fused, epochs = planned(sorted(m))
        expected = float(cost.group(np.array([np.count_nonzero(fused) / fused.size]),
                                    own[m].sum())[0])
        # a move out of a group can leave the rest costing more than its members alone: split
        if len(m) > 1 and expected > own[m].sum():
            kept.update({(i,): planned([i]) for i in m})
        else:
            kept[tuple(sorted(m))] = (fused, epochs)
    width = max(3, len(str(len(kept))))
    groups = []
    for k, members in enumerate(sorted(kept, key=lambda m: m[0])):
        fused, epochs = kept[members]
        groups.append(Group(f"group-{k:0{width}d}", tuple(maps[i].chip_id for i in members),
                            fused, epochs, float(planned_own[list(members)].sum())))
    return groups
