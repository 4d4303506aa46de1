"""Layer formulations that XLA:CPU runs fast; outputs equal XLA's own ops.

Three ops are slow on XLA:CPU when timed alone (2-core CPU, ResNet-50 / Lite0 shapes,
2026-11-22; BENCHMARKS.md):

- grouped (depthwise) convolutions, forward and backward;
- the weight gradient of a 1x1 convolution. Autodiff emits it as a convolution whose
  window is the whole feature map, at 4-5x the cost of the forward pass;
- the gradient of a max pool (`select_and_scatter`), at ~9x its forward.

So a depthwise conv becomes a sum of k*k shifted, strided slices times per-channel
weights (`depthwise_conv`), a 1x1 conv a [B*H*W, Cin] x [Cin, Cout] matmul
(`conv_general_dilated_fn('dot')`, whose gradients autodiff also forms as 2-D matmuls), and a
max pool a running maximum over k*k shifted slices (`max_pool`). The parameters keep the
`nn.Conv` shapes, so pretrained weights load either way. `'auto'` picks the shift
depthwise and the dot 1x1 forms on CPU and XLA's ops elsewhere (measure on GPU/TPU before
relying on either). The shift max pool is 5x faster alone but made the whole ResNet-50
step slower (1.82 -> 2.00 s, batch 8, 224^2), so `'auto'` keeps XLA's max pool everywhere.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "shift", "grouped")
POINTWISE_IMPLS = ("auto", "dot", "conv")
MAXPOOL_IMPLS = ("auto", "shift", "window")
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
      'shift' (running maximum of the k*k shifted slices) or 'auto' (= 'window': measured
      faster inside the whole ResNet-50 step, see the module docstring).

  Returns:
    [B, (H + 2 pad - k) // stride + 1, (W + ...) // stride + 1, C].

  The forms differ only in the gradient at ties inside a window: 'window' routes it to one
  maximum, 'shift' splits it between the tied ones (`lax.max`'s rule). After a ReLU the
  common tie is at 0, where the ReLU's own gradient is 0 either way.
  """
  impl = resolve_impl("model.maxpool_impl", impl, MAXPOOL_IMPLS, "window", "window")
  if impl == "window":
    return nn.max_pool(x, (window, window), strides=(stride, stride),
                       padding=((pad, pad), (pad, pad)))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  out_hw = ((xp.shape[1] - window) // stride + 1, (xp.shape[2] - window) // stride + 1)
  out = None
  for _, tap in _shifted_taps(xp, (window, window), stride, 1, out_hw):
    out = tap if out is None else jnp.maximum(out, tap)
  return out


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
