"""DSCNet-R's network (`methods/dscnet.py`, METHODS.md §4): backbone + CAM head, k-means
pixel groups, class nodes and the fused refined-CAM head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.heads import CAMHead, backbone_pointwise_impl
from wsss_jax.ops import group_contrast as gc
from wsss_jax.ops.norms import l2_normalize

KEY_SALT = 0xD5C  # decorrelates the k-means seeds from other uses of config.seed


class DSCNetR(nn.Module):
  """Backbone + CAM head (+ groups, class nodes and the fused refined-CAM head).

  Call: `(images [B, H, W, 3], train, labels=None [B, C-1], kmeans_keys=None [B] keys)` ->
  dict (float32):
    `logits` [B, C-1], `cams` [B, h, w, C-1] (refined or plain, see `cams_output`);
    `plain_logits`, `plain_cams`; `features` [B, h, w, D]; `valid` bool [B, h, w];
    with groups: `assign` int32 [B, N] (N = h*w, -1 on padding), `group_emb` [B, K, D]
    (L2-normalised, K = C slots), `group_valid` bool [B, K]; with class nodes:
    `class_nodes` [C, D] (normalised; 0 = background), `group_class_logits` [B, K, C];
    with fusion: `refined_logits`, `refined_cams`.
  Groups are computed when `use_fusion` (always) or `train and use_groups`.

  Attributes:
    backbone: returns `{'out': [B, h, w, D], ...}` (registry) or the array itself.
    num_classes: C with background.
  """
  backbone: nn.Module
  num_classes: int
  use_groups: bool = True
  use_class_nodes: bool = True
  use_fusion: bool = True
  cams_output: str = "refined"  # 'refined' | 'plain'
  kmeans_space: str = "pearson"
  kmeans_iters: int = 10
  kmeans_init: str = "kmeans++"
  extra_groups: int = 1
  class_temperature: float = 0.1  # fusion's q = softmax_c cos(g, w_c) / t
  class_nodes_grad: bool = True
  fusion_temperature: float = 0.1
  fusion_combine: str = "sum"
  ignore_zero_padding: bool = True
  pool: str = "gap"
  tap_threshold: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, labels: jax.Array | None = None,
               kmeans_keys: jax.Array | None = None) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train)
    feats = feats["out"] if isinstance(feats, dict) else feats
    f = feats.astype(jnp.float32)
    b, h, w, d = f.shape
    k_max, n = self.num_classes, h * w
    head = CAMHead(self.num_classes - 1, self.pool, self.tap_threshold, self.dtype,
                   backbone_pointwise_impl(self.backbone), name="cam_head")
    plain = head(feats)
    valid = (gc.valid_cells(images, (h, w)) if self.ignore_zero_padding
             else jnp.ones((b, h, w), bool))
    out = {"logits": plain["logits"], "cams": plain["cams"], "plain_logits": plain["logits"],
           "plain_cams": plain["cams"], "features": f, "valid": valid}
    # Initialisation creates every parameter (`bg_node`) whatever the call path.
    if not (self.use_fusion or ((train or self.is_initializing()) and self.use_groups)):
      return out

    if labels is None:  # inference: the classes the classifier predicts on the real cells
      v = valid[..., None].astype(jnp.float32)
      scores = jnp.sum(plain["cams"] * v, (1, 2)) / jnp.maximum(jnp.sum(v, (1, 2)), 1.0)
      present = scores > 0.0
    else:
      present = labels > 0.5
    if kmeans_keys is None:
      kmeans_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(KEY_SALT), i))(
          jnp.arange(b))
    mask = valid.reshape(b, n)
    assign = gc.batch_groups(kmeans_keys, f, valid, present, k_max=k_max,
                             extra_groups=self.extra_groups, space=self.kmeans_space,
                             num_iters=self.kmeans_iters, init=self.kmeans_init)
    means, counts = jax.vmap(lambda x, a: gc.group_means(x, a, k_max))(f.reshape(b, n, d),
                                                                         assign)
    out.update(assign=assign, group_emb=l2_normalize(means), group_valid=counts > 0)
    if not (self.use_class_nodes or self.use_fusion):
      return out

    # Fusion's class nodes (Eq. 8 -> 10): the CAM classifier's weights (C-1 foreground) and
    # a learned background. SGCL no longer uses them (methods/dscnet.py builds its class
    # nodes from the batch's groups, issue 31).
    kernel = head.variables["params"]["classifier"]["kernel"].reshape(d, -1).T  # [C-1, D]
    if not self.class_nodes_grad:  # SGCL then leaves the CAM classifier to L_cls alone
      kernel = jax.lax.stop_gradient(kernel)
    bg = self.param("bg_node", nn.initializers.normal(1.0), (d,), jnp.float32)
    nodes = l2_normalize(jnp.concatenate([bg[None], kernel.astype(jnp.float32)], 0))
    logits_kc = gc.class_logits(means, nodes, self.class_temperature)  # [B, K, C]
    out.update(class_nodes=nodes, group_class_logits=logits_kc)
    if not self.use_fusion:
      return out

    probs = jax.nn.softmax(logits_kc, axis=-1)
    pix_probs = jnp.take_along_axis(probs, jnp.maximum(assign, 0)[..., None], axis=1)
    pearson = gc.pearson_normalize(f).reshape(b, n, d)

    def fuse(x, p, q, m):
      a_pix = gc.pixel_affinity(p, m, self.fusion_temperature)
      a_sem = gc.semantic_affinity(q, m)
      return gc.fuse_features(x, a_pix, a_sem, m, self.fusion_combine)

    fprime = jax.vmap(fuse)(f.reshape(b, n, d), pearson, pix_probs, mask).reshape(b, h, w, d)
    fhat = jnp.concatenate([f, fprime], axis=-1).astype(self.dtype)
    refined = CAMHead(self.num_classes - 1, self.pool, self.tap_threshold, self.dtype,
                      backbone_pointwise_impl(self.backbone), name="refined_head")(fhat)
    out.update(refined_logits=refined["logits"], refined_cams=refined["cams"])
    if self.cams_output == "refined":
      out.update(logits=refined["logits"], cams=refined["cams"])
    return out
