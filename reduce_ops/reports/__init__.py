"""Figures, one module per stage that draws them (`resilience`: Figs. 2a and 2b, `plan`,
`groups`, `compare`: Fig. 3, `robustness`), and `common` for what they share; a change to one
figure re-runs only its stage. Nothing is imported here.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot state), so building
one has no global side effect. Every `plot_*` function has a `*_figure` twin that returns the Figure
for inspection; `plot_*` saves it as PNG through reduce_ops.atomic (temporary name, then rename).
"""
