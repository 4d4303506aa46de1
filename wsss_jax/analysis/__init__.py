"""Read-only views of work directories for notebooks and `compare`: results, CAMs,
pseudo-labels, per-image scores, metrics logs (`reader`) and method internals of a trained
model (`features`). Nothing here writes to a work directory.
"""
