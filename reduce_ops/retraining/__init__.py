"""Step 3 of Reduce, per-chip fault-aware training: `units` (the FAT runs to do, from the plan
and the groups), `worker` (train and verify one run; no MLflow), `registration` (log a run and
register its chips' models; the logging process's side), `schedule` (the runs on the workers,
their models handed to the logging process). Nothing is imported here."""
