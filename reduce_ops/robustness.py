"""Robustness of quantized (int8) models to faults in their stored weight bits: accuracy over a
grid of bit error rates x fault models x repetitions, each trial a fresh seeded draw.

Fault models: `bit_flip` (every stored bit flips with probability BER) and `stuck_at` (each bit
cell is stuck, at random or given polarity, with probability BER). The same trial seed gives the
same faults to every model variant of one architecture (a paired comparison).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from reduce_ops import execution
from reduce_ops.config import ExecutionConfig
from reduce_ops.hardware.bitfaults import check_rate, draw_model_bit_flips, stuck_at
from reduce_ops.poolfirst import pool_first
from reduce_ops.progress import Progress
from reduce_ops.quant import QuantizedWeights
from reduce_ops.training import evaluate

FAULT_MODELS = ("bit_flip", "stuck_at")
TRIAL_COLUMNS = ["variant", "fault_model", "ber", "repetition", "seed", "accuracy",
                 "faulty_bits"]
SUMMARY_COLUMNS = ["variant", "fault_model", "ber", "n", "mean", "std", "min", "max"]


@dataclass(frozen=True)
class TrialSpec:
    """One (fault model, BER, repetition) and the seed of its faults."""

    fault_model: str
    ber: float
    repetition: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.fault_model}-ber{self.ber:.0e}-rep{self.repetition}"


def trial_grid(fault_models: Sequence[str], bers: Sequence[float], repetitions: int,
               seed: int, key: str = "robustness.bers") -> list[TrialSpec]:
    """Every (fault model, BER, repetition), its seed keyed by all three: adding BERs or
    repetitions never changes another trial's faults."""
    for i, ber in enumerate(bers):
        check_rate(ber, f"{key}[{i}]")
    out = []
    for model_index, fault_model in enumerate(fault_models):
        for ber in sorted(bers):
            for rep in range(repetitions):
                ss = np.random.SeedSequence([seed, model_index, int(round(ber * 1e12)), rep])
                out.append(TrialSpec(fault_model, float(ber), rep, int(ss.generate_state(1)[0])))
    return out


def draw_faults(spec: TrialSpec, shapes: Mapping[str, tuple[int, ...]],
                polarity: int | str = "random", bits: Sequence[int] | None = None,
                key: str = "robustness") -> tuple[dict, int]:
    """The trial's faults for every weight (by parameter name) and the faulty bit count."""
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.fault_model == "bit_flip":
        flips = draw_model_bit_flips(shapes, spec.ber, gen, f"{key}.bers")
        return flips, sum(f.n_flipped for f in flips.values())
    faults, n = {}, 0
    for name, shape in shapes.items():
        faults[name], count = stuck_at(shape, spec.ber, polarity, gen, bits, key)
        n += count
    return faults, n


@dataclass(frozen=True)
class _Inputs:
    """What every trial shares (sent to each worker once)."""

    variants: Mapping[str, nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    layer_types: Sequence[str]
    polarity: int | str
    bits: Sequence[int] | None

    @cached_property
    def fast(self) -> dict[str, nn.Module]:
        """Each variant as it is evaluated (reduce_ops.poolfirst), traced once per worker."""
        return {name: pool_first(model) for name, model in self.variants.items()}


def run_trial(shared: _Inputs, spec: TrialSpec) -> list[tuple]:
    """One trial: every variant under its faults (one draw, shared by the variants of one
    architecture); per variant (row of TRIAL_COLUMNS, (start, end) of its draw and evaluation)."""
    out = []
    shapes = None
    for name, model in shared.variants.items():
        started = time.time()
        with QuantizedWeights(model, shared.layer_types) as quantized:
            if quantized.shapes() != shapes:     # another architecture: its own draw
                shapes = quantized.shapes()
                faults, n_bits = draw_faults(spec, shapes, shared.polarity, shared.bits)
            quantized.set_faults(faults, "robustness")
            with parametrize.cached():
                accuracy = evaluate(shared.fast[name], shared.x, shared.y)[0]
        out.append(((name, spec.fault_model, spec.ber, spec.repetition, spec.seed, accuracy,
                     n_bits), (started, time.time())))
    return out


def run_trials(variants: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
               specs: Sequence[TrialSpec], layer_types: Sequence[str],
               polarity: int | str = "random", bits: Sequence[int] | None = None,
               on_trial: Callable[..., None] | None = None,
               progress: Progress | None = None,
               exe: ExecutionConfig | None = None) -> pd.DataFrame:
    """Accuracy of every variant under every trial's faults (one draw per trial, shared by
    the variants), the trials on `exe`'s workers; `on_trial(variant, spec, accuracy,
    faulty_bits, (start, end))` on this process as each finishes (start and end: time.time()
    of the variant's draw and evaluation). Rows in trial order, whatever order they end in."""
    done: dict[int, list[tuple]] = {}

    def finished(i: int, result: list[tuple]) -> None:
        done[i] = [row for row, _ in result]
        if on_trial is not None:
            for row, span in result:
                on_trial(row[0], specs[i], row[5], row[6], span)
        if progress is not None:
            progress.done(specs[i].key, ", ".join(f"{r[0]} {r[5]:.4f}" for r in done[i]))

    execution.map_unordered(run_trial, _Inputs(variants, x, y, tuple(layer_types), polarity,
                                                bits),
                            list(specs), exe or execution.LOCAL, finished)
    return pd.DataFrame([row for i in range(len(specs)) for row in done[i]],
                        columns=TRIAL_COLUMNS)


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and range of accuracy over repetitions, per variant, fault
    model and BER."""
    g = trials.groupby(["variant", "fault_model", "ber"], sort=True)["accuracy"]
    out = g.agg(n="count", mean="mean", std="std", min="min", max="max").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out[SUMMARY_COLUMNS]


def accuracy_at(summary: pd.DataFrame, variant: str, fault_model: str, ber: float) -> float:
    """The mean accuracy of one cell of the summary (NaN when it was not measured)."""
    cell = summary[(summary["variant"] == variant) & (summary["fault_model"] == fault_model)
                   & np.isclose(summary["ber"], ber)]
    return float(cell["mean"].iloc[0]) if len(cell) else math.nan


def ber_column(fault_model: str, ber: float) -> str:
    """Column of the variant table holding the mean accuracy of one (fault model, BER)."""
    return f"{fault_model}@{ber:.0e}"


def variant_table(clean: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per model: its settings and measures (`clean`: variant, activation_threshold,
    sharpness, rho, activation_sparsity, flatness_loss_increase, float_accuracy,
    int8_accuracy) and its mean accuracy at every (fault model, BER), in `clean`'s order."""
    wide = summary.assign(column=[ber_column(f, b) for f, b in
                                  zip(summary["fault_model"], summary["ber"])])
    wide = wide.pivot(index="variant", columns="column", values="mean")
    ordered = [ber_column(f, b) for f, b in
               dict.fromkeys(zip(summary["fault_model"], summary["ber"]))]
    return clean.merge(wide[ordered], left_on="variant", right_index=True, how="left")


def format_variant_table(table: pd.DataFrame) -> str:
    """The variant table as text: one block per fault model, a column per BER."""
    lines = []
    ber_columns = [c for c in table.columns if "@" in c]
    for fault_model in dict.fromkeys(c.split("@")[0] for c in ber_columns):
        cols = [c for c in ber_columns if c.startswith(fault_model + "@")]
        lines.append(f"{fault_model}: mean test accuracy over repetitions at each BER")
        lines.append(f"  {'model':<16} {'sparsity':>8} {'flatness':>8} {'int8':>6} "
                     + " ".join(f"{c.split('@')[1]:>6}" for c in cols))
        for row in table.to_dict("records"):
            lines.append(f"  {row['variant']:<16} {row['activation_sparsity']:>8.3f} "
                         f"{row['flatness_loss_increase']:>8.4f} {row['int8_accuracy']:>6.3f} "
                         + " ".join(f"{row[c]:>6.3f}" for c in cols))
    return "\n".join(lines)
