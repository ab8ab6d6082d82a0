"""Building blocks of ``training.evaluate``: prompts, folder layout, encoders, metrics, report.

Nothing here downloads: every model is read from a local path or from an installed package.
"""
