"""Layer formulations that XLA:CPU runs fast; outputs equal XLA's own ops.

Three ops are slow on XLA:CPU when timed alone (2-core CPU, ResNet-50 / Lite0 shapes,
2026-11-22; BENCHMARKS.md):

- grouped (depthwise) convolutions, forward and backward;
- the weight gradient of a 1x1 convolution. Autodiff emits it as a convolution whose
  window is the whole feature map, at 4-5x the cost of the forward pass;
- the gradient of a max pool (`select_and_scatter`), at ~9x its forward.

So a depthwise conv becomes a sum of k*k shifted, strided slices times per-channel
weights (`depthwise_conv`), and a 1x1 conv a [B*H*W, Cin] x [Cin, Cout] matmul
(`conv_general_dilated_fn('dot')`, whose gradients autodiff also forms as 2-D matmuls). The
parameters keep the `nn.Conv` shapes, so pretrained weights load either way.

The max pool has two other forms (`max_pool`). 'shift', a running maximum over the k*k
shifted slices, is 5x faster alone but made the whole ResNet-50 step slower (1.82 -> 2.00 s,
batch 8, 224^2). 'argmax' keeps XLA's forward and replaces only the gradient
(`_max_pool_argmax`). It removes ~0.14 s of per-op time from that step; the step's wall
time moved by ~3 %, inside the host's spread (BENCHMARKS.md).

`'auto'` picks the shift depthwise, the dot 1x1 and the argmax max pool on CPU, and XLA's
ops elsewhere (measure on GPU/TPU before relying on either).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "shift", "grouped")
POINTWISE_IMPLS = ("auto", "dot", "conv")
MAXPOOL_IMPLS = ("auto", "argmax", "shift", "window")
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_impl(field: str, impl: str, choices: Sequence[str], on_cpu: str,
                 elsewhere: str) -> str:
  """`impl`, or for 'auto' the backend's choice; a clear error names `field` otherwise."""
  if impl not in choices:
    raise ValueError(f"{field} must be one of {'|'.join(choices)}, got {impl!r}")
  if impl == "auto":
    return on_cpu if jax.default_backend() == "cpu" else elsewhere
  return impl


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
  """TF 'SAME' padding (extra pixel after), as `lax` computes for padding='SAME'."""
  out = -(-size // stride)
  total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, dilation: int = 1,
                   impl: str = "auto") -> jax.Array:
  """Depthwise conv with TF 'SAME' padding.

  Args:
    x: [B, H, W, C].
    kernel: [k, k, 1, C] (HWIO with feature groups = C).
    stride: spatial stride.
    dilation: kernel dilation.
    impl: 'shift' (sum of shifted slices), 'grouped' (lax grouped conv) or 'auto'
      (shift on CPU, grouped elsewhere).

  Returns:
    [B, ceil(H/stride), ceil(W/stride), C].
  """
  impl = resolve_impl("model.depthwise_impl", impl, DEPTHWISE_IMPLS, "shift", "grouped")
  kh, kw, _, c = kernel.shape
  pads = (same_pads(x.shape[1], kh, stride, dilation),
          same_pads(x.shape[2], kw, stride, dilation))
  if impl == "grouped":
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=pads,
        rhs_dilation=(dilation, dilation), dimension_numbers=_NHWC,
        feature_group_count=c)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_hw = ((xp.shape[1] - (kh - 1) * dilation - 1) // stride + 1,
            (xp.shape[2] - (kw - 1) * dilation - 1) // stride + 1)
  out = None
  for (i, j), tap in _shifted_taps(xp, (kh, kw), stride, dilation, out_hw):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _shifted_taps(xp: jax.Array, kernel: tuple[int, int], stride: int, dilation: int,
                  out_hw: tuple[int, int]):
  """The kh*kw strided slices of a padded [B, Hp, Wp, C] map, one per kernel tap, each
  [B, out_h, out_w, C], with their (i, j) tap index."""
  b, _, _, c = xp.shape
  ho, wo = out_hw
  for i in range(kernel[0]):
    for j in range(kernel[1]):
      y0, x0 = i * dilation, j * dilation
      yield (i, j), lax.slice(xp, (0, y0, x0, 0),
                              (b, y0 + (ho - 1) * stride + 1, x0 + (wo - 1) * stride + 1, c),
                              (1, stride, stride, 1))


def max_pool(x: jax.Array, window: int, stride: int, pad: int, impl: str = "auto"
             ) -> jax.Array:
  """k x k max pool with symmetric padding `pad` (PyTorch's `MaxPool2d`).

  Args:
    x: [B, H, W, C].
    impl: 'window' (`nn.max_pool`: reduce_window, gradient by select_and_scatter),
      'argmax' (the same forward; the gradient of each window goes to its first maximum
      through k*k strided pads, `_max_pool_argmax`), 'shift' (running maximum of the k*k
      shifted slices, differentiated by autodiff) or 'auto' ('argmax' on CPU, 'window'
      elsewhere; see the module docstring).

  Returns:
    [B, (H + 2 pad - k) // stride + 1, (W + ...) // stride + 1, C].

  The forms differ only in the gradient at ties inside a window: 'window' and 'argmax'
  route it to the first maximum in row-major window order, 'shift' splits it between the
  tied ones (`lax.max`'s rule). After a ReLU the common tie is at 0, where the ReLU's own
  gradient is 0 either way.
  """
  impl = resolve_impl("model.maxpool_impl", impl, MAXPOOL_IMPLS, "argmax", "window")
  if impl == "window":
    return nn.max_pool(x, (window, window), strides=(stride, stride),
                       padding=((pad, pad), (pad, pad)))
  if impl == "argmax":
    return _max_pool_argmax(x, window, stride, pad)
  xp, out_hw = _pad_for_pool(x, window, stride, pad)
  out = None
  for _, tap in _shifted_taps(xp, (window, window), stride, 1, out_hw):
    out = tap if out is None else jnp.maximum(out, tap)
  return out


def _pad_for_pool(x: jax.Array, window: int, stride: int, pad: int
                  ) -> tuple[jax.Array, tuple[int, int]]:
  """`x` padded with -inf on H and W, and the pool's output (H, W)."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  return xp, ((xp.shape[1] - window) // stride + 1, (xp.shape[2] - window) // stride + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_argmax(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
  """XLA's reduce_window max pool whose gradient avoids `select_and_scatter`.

  XLA:CPU expands `select_and_scatter` into an iota per dimension, a variadic
  reduce_window that finds each window's argmax coordinates, and a scatter: ~0.14 s of
  per-op time in the ResNet-50 step (batch 8, 224²) for its one max pool, though much of it
  ran beside other ops (the step's wall time gained ~3 %). Here the backward pass finds the
  winning tap of each window as a small integer (one fused pass over the k*k strided
  slices) and adds each tap's share back with a strided `lax.pad`, which XLA fuses into one
  loop over the input.
  """
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)))


def _max_pool_argmax_fwd(x, window, stride, pad):
  y = _max_pool_argmax(x, window, stride, pad)
  return y, (x, y)


def _max_pool_argmax_bwd(window, stride, pad, residuals, g):
  x, y = residuals
  xp, out_hw = _pad_for_pool(x, window, stride, pad)
  # The first tap (row-major) equal to the window's maximum: select_and_scatter's choice.
  winner = jnp.full(y.shape, window * window, jnp.int8 if window * window < 128 else jnp.int32)
  taps = list(_shifted_taps(xp, (window, window), stride, 1, out_hw))
  for k, (_, tap) in reversed(list(enumerate(taps))):
    winner = jnp.where(tap == y, jnp.asarray(k, winner.dtype), winner)
  zero = jnp.zeros((), g.dtype)
  dxp = jnp.zeros(xp.shape, g.dtype)
  span = ((out_hw[0] - 1) * stride + 1, (out_hw[1] - 1) * stride + 1)
  for k, ((i, j), _) in enumerate(taps):
    share = jnp.where(winner == k, g, zero)
    dxp = dxp + lax.pad(share, zero, ((0, 0, 0), (i, xp.shape[1] - i - span[0], stride - 1),
                                      (j, xp.shape[2] - j - span[1], stride - 1), (0, 0, 0)))
  return (dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]],)


_max_pool_argmax.defvjp(_max_pool_argmax_fwd, _max_pool_argmax_bwd)


def _zero_padding(padding: Any) -> bool:
  if isinstance(padding, str):
    return padding in ("SAME", "SAME_LOWER", "VALID")  # A 1x1 window never pads.
  return all(tuple(p) == (0, 0) for p in padding)


def pointwise_as_dot(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                     padding: Any, lhs_dilation: Sequence[int] | None = None,
                     rhs_dilation: Sequence[int] | None = None,
                     dimension_numbers: Any = None, feature_group_count: int = 1,
                     batch_group_count: int = 1, precision: Any = None,
                     preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` with 1x1 NHWC/HWIO convolutions computed as a matmul.

  A 1x1 conv with stride s is `x[:, ::s, ::s, :] @ kernel[0, 0]` ([B, H', W', Cin] x
  [Cin, Cout]). Every other convolution (larger windows, groups, input dilation, padding,
  other layouts) goes to `lax.conv_general_dilated` unchanged. Signature and result
  ([B, H', W', Cout]) as `lax.conv_general_dilated`, so it plugs into
  `nn.Conv(conv_general_dilated=...)`.
  """
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if (lhs.ndim == 4 and dnums == canonical and rhs.shape[:2] == (1, 1)
      and feature_group_count == 1 and batch_group_count == 1
      and all(d == 1 for d in (lhs_dilation or (1, 1))) and _zero_padding(padding)):
    sy, sx = window_strides
    x = lhs[:, ::sy, ::sx, :]
    # A 2-D matmul, not an einsum over [B, H, W]: autodiff then forms the weight gradient
    # as one [C, N] x [N, O] dot. With three contracting dims XLA:CPU first transposed
    # the [B, H, W, O] cotangent into [O, B*H*W], a copy that cost more than the dot
    # (ResNet-50 step: 36 such copies, ~0.4 s of ~2 s; BENCHMARKS.md).
    out = jnp.dot(x.reshape(-1, x.shape[-1]), rhs[0, 0], precision=precision,
                  preferred_element_type=preferred_element_type)
    return out.reshape(*x.shape[:-1], rhs.shape[-1])
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


def conv_general_dilated_fn(pointwise_impl: str) -> Callable[..., jax.Array]:
  """The `conv_general_dilated` for `nn.Conv`: 'dot' (1x1 as matmuls), 'conv' (XLA's
  convolution) or 'auto' (dot on CPU, conv elsewhere)."""
  impl = resolve_impl("model.pointwise_impl", pointwise_impl, POINTWISE_IMPLS, "dot",
                      "conv")
  return pointwise_as_dot if impl == "dot" else lax.conv_general_dilated
