"""Validation as EveryDream2 does it (``validation_config``): held-out, manual and extra image
sets and a stabilized training loss, evaluated with fixed noise at a fixed cadence.

`sets` builds the sets from the checked settings file (before any model loads), `evaluate` runs
one deterministic pass over a set, `schedule` says when passes run; the component that calls
them is `training.components.validation.Validation`.
"""
