"""BatchNorm applied as one per-channel scale and shift, `y = x * a + b`.

Flax's `nn.BatchNorm` computes `(x - mean) * (scale * rsqrt(var + eps)) + bias`. Under
autodiff the centred `x - mean` is a residual of that multiply, so every BatchNorm in a
train step writes a second activation-sized array in the forward pass and reads it back in
the backward pass. Here the statistics are folded first into per-channel
`a = scale * rsqrt(var + eps)` and `b = bias - mean * a` (arrays of C numbers), so the only
activation-sized residual is `x`, which the layer before already keeps. The outputs and
gradients are the same up to rounding (`tests/test_batch_norm.py`). Measured on the
ResNet-50 CAM step (2-core CPU, batch 8, 224², fp32; BENCHMARKS.md): 1.71 -> 1.53 s per
step, peak host memory 2.34 -> 1.89 GiB.

`BatchNorm` subclasses `nn.BatchNorm` with the same fields, variables (`params/scale`,
`params/bias`, `batch_stats/mean`, `batch_stats/var`) and running-average rule, so
checkpoints and the torchvision/TF weight maps are unchanged, and `train/step.py`'s SyncBN
interceptor (which sets `axis_name` on every `nn.BatchNorm`) applies to it.

The batch variance is Flax's default "fast variance", `max(E[x²] − E[x]², 0)`, in float32
(both moments are averaged over `axis_name` in one `pmean`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from flax.linen import dtypes


def batch_moments(x: jax.Array, reduction_axes: tuple[int, ...], axis_name: str | None = None,
                  axis_index_groups: Any = None) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance of `x` over `reduction_axes`, and over the devices of
  `axis_name` when given, in at least float32.

  Returns `(mean, var)`, each shaped like `x` without `reduction_axes`.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  moments = jnp.stack([jnp.mean(x, reduction_axes), jnp.mean(lax.square(x), reduction_axes)])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name, axis_index_groups=axis_index_groups)
  mean, mean_sq = moments[0], moments[1]
  return mean, jnp.maximum(mean_sq - lax.square(mean), 0.0)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same fields and variables) whose normalisation is `x * a + b`.

  Call: `(x [..., C] for the default axis=-1, use_running_average=None) -> y` (same shape;
  dtype `self.dtype`, or inferred from `x` and the parameters as in Flax).
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    if mask is not None:
      raise NotImplementedError(f"{self.name}: BatchNorm with a mask is not supported here; "
                                "use flax.linen.BatchNorm")
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
    feature_axes = tuple(sorted(a % x.ndim for a in axes))
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype),
                            feature_shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype),
                           feature_shape)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # At init the reduction axis may not exist yet (Flax's rule), and the running
      # averages keep their initial values.
      axis_name = None if self.is_initializing() else self.axis_name
      mean, var = batch_moments(x, reduction_axes, axis_name, self.axis_index_groups)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var

    args = [x]
    mul = lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
      mul = mul * scale
      args.append(scale)
    shift = -mean * mul
    if self.use_bias:
      bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
      shift = shift + bias
      args.append(bias)
    broadcast = [x.shape[i] if i in feature_axes else 1 for i in range(x.ndim)]
    y = x * mul.reshape(broadcast) + shift.reshape(broadcast)
    return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))
