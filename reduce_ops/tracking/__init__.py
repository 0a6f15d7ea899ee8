"""The only package that talks to MLflow, one module per concern: `store` (where runs are
recorded), `runs` (stage runs, child runs, reading them back), `logger` (a stage's MLflow work in
a separate process), `registry` (registered models per chip), `owner` (which process owns a
run). Nothing is imported here: a stage imports the modules it uses."""
