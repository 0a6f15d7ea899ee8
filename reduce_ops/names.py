"""Names shared by several modules: safe ids, registered model names, MLflow tag and metric keys.

Every tag and metric key the project writes or searches for is spelled here once; tracking.py
(the only module that imports MLflow) and the stage modules refer to these constants.
"""

from __future__ import annotations

import re

# Chip ids and the registry prefix become file names and registered-model names.
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SAFE_NAME_HELP = "1-64 characters from A-Z a-z 0-9 _ . -"


def safe_name_problem(value: object) -> str | None:
    """Why `value` cannot be a chip id / registry prefix, or None when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if not SAFE_NAME.fullmatch(value):
        return f"use {SAFE_NAME_HELP}, got {value!r}"
    if value.startswith((".", "-")):
        return f"must not start with '.' or '-', got {value!r}"
    return None


def registered_name(prefix: str, chip_id: str) -> str:
    """The registered model of a chip: <prefix>-<chip_id>."""
    return f"{prefix}-{chip_id}"


PREPARED_META_FILE = "meta.json"         # the prepared split's description (data.prepare)
CHAMPION = "champion"                    # alias of the version a chip ships with
CHIP_MODEL_FILE = "chip_model.pt"        # run artifact: state_dict + arch, trainable
SHIPPED, REJECTED = "shipped", "rejected"   # a chip's status under the current plan
RETIRED = "retired"                      # a registered chip the current plan's fleet lacks

# --------------------------------------------------------------------------- run tags
TAG_PARENT = "mlflow.parentRunId"        # MLflow's own: a child run's parent
TAG_RUN_NAME = "mlflow.runName"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"   # the UI opens on runs, not GenAI traces
EXPERIMENT_KIND = "custom_model_development"
TAG_STAGE = "reduce_ops.stage"
TAG_GRID_HASH = "reduce_ops.grid_hash"
TAG_BASELINE_HASH = "reduce_ops.baseline_hash"
TAG_DATASET_HASH = "reduce_ops.dataset_hash"
TAG_RESILIENCE_RUN = "reduce_ops.resilience_run"
TAG_PLAN_RUN = "reduce_ops.plan_run_id"
TAG_CHIP = "reduce_ops.chip_id"
TAG_REJECTED = "reduce_ops.rejected"
TAG_TRIAL = "reduce_ops.trial"
TAG_REUSED_FROM = "reduce_ops.reused_from"
TAG_POLICY = "reduce_ops.policy"
TAG_SERIALIZATION = "reduce_ops.serialization_format"
TAG_PT2_FALLBACK = "reduce_ops.pt2_fallback"
TAG_GROUP = "reduce_ops.group_id"
TAG_GROUP_RUN = "reduce_ops.group_run_id"     # a member's chip run -> its group's run
TAG_DRIVER = "reduce_ops.driver"       # host:pid:start of the process that owns a stage run

# --------------------------------------------------------------------------- model version tags
VTAG_CHIP = "chip_id"                    # also on the registered model itself
VTAG_FAULT_RATE = "fault_rate"           # also on the registered model itself
VTAG_PLAN_RUN = "plan_run_id"            # a rerun skips chips registered for this plan...
VTAG_MODEL_KEY = "model_key"             # ...under the same key (registration.model_key)
VTAG_TEST_ACCURACY = "test_accuracy"
VTAG_VAL_ACCURACY = "val_accuracy"
VTAG_CONSTRAINT_MET = "constraint_met"
VTAG_CONSTRAINT_LEVEL = "constraint_level"
VTAG_PLANNED_EPOCHS = "planned_epochs"
VTAG_PRUNED_FRACTION = "pruned_fraction"
VTAG_SERIALIZATION = "serialization_format"
VTAG_ACTUAL_EPOCHS = "actual_epochs"     # planned + verification extensions
VTAG_N_CHECKS = "n_checks"
VTAG_VERIFIED = "verified"               # passed the validation check (only those are champion)
VTAG_REASON = "reason"
VTAG_DECISION_LEVEL = "decision_level"
VTAG_GROUP = "group_id"                  # eFAT group the model was trained for
VTAG_GROUP_SIZE = "group_size"
VTAG_FUSED_RATE = "fused_fault_rate"
VTAG_FAILED_GROUP_EPOCHS = "failed_group_epochs"   # chip trained alone after its group missed:
                                                  # its share of that group run's epochs
VTAG_FAILED_GROUP = "failed_group_id"

# --------------------------------------------------------------------------- registered model tags
MTAG_STATUS = "status"                   # shipped | rejected, under the current plan
MTAG_REASON = "reason"                   # why the current plan rejected the chip

# --------------------------------------------------------------------------- metric keys
VAL_ACCURACY = "val_accuracy"
TEST_ACCURACY = "test_accuracy"
RETRAINING_EPOCHS = "retraining_epochs"
TRIAL_SECONDS = "trial_seconds"
VAL_LOST = "val_lost"          # validation images the baseline gets right and a model wrong
VAL_GAINED = "val_gained"      # ... wrong and the model right
# measured once on every baseline and kept in its checkpoint's info (robustness reports them)
BASELINE_MEASURES = ("activation_sparsity", "flatness_loss_increase", "int8_test_accuracy")

# --------------------------------------------------------------------------- browsing the runs
TAG_CHILDREN_EXPERIMENT = "reduce_ops.children_experiment"   # a stage run -> its children's
TAG_VERDICT = "reduce_ops.verdict"       # a chip's or group's run: shipped | rejected | missed
MISSED = "missed"                        # an eFAT group that missed at the cap (members alone)
TAG_TRAINED = "reduce_ops.trained"       # false on a chip run that trained nothing
