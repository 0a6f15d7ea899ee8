"""reduce-ops: retrain one DNN for a fleet of faulty systolic-array chips at the lowest cost."""
