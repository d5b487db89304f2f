"""Studies of WeSaR against its baselines: methods x learning rates x seeds through the driver
(`runner`); per-run and per-study numbers (`summary`, typed in `schema`); the Markdown report
(`report`) assembled from `tables`, `findings` and `figures`, which share `selection` (which
runs to show) and `format` (numbers and LRs as text)."""
