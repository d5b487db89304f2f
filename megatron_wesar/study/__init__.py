"""Studies of WeSaR against its baselines: methods x learning rates x seeds through the driver
(`runner`), per-run and per-study numbers (`summary`), and the Markdown report (`report`)."""
