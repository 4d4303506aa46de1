"""Pure, jittable math: CAMs, dense CRF, k-means, contrastive and method losses, memory
banks, prototypes, label propagation, metrics, resizing.

`IGNORE_INDEX` is the one ignore label of the package (docs/CONVENTIONS.md): void pixels,
padding and "unsure" pseudo-labels. It lives here, at the bottom of the layers, so data
builders, losses, metrics and stages all share it; this file imports nothing (the data
layer reads it without loading JAX).
"""

IGNORE_INDEX = 255
