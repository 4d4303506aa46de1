"""ResNet: shapes, torchvision/timm checkpoint round trips, strict errors, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.bench import torch_baseline
from wsss_jax.models import build_model, load_pretrained, resnet, weights
from wsss_jax.models.resnet import Bottleneck, ResNet
from wsss_jax.models.torch_pickle import save_torch_file


def _abstract(model, size=64):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.fixture(scope="module")
def r50():
  """ResNet-50 (with fc) random variables and their torchvision-named export."""
  model = ResNet(50, output_stride=16, num_classes=10)
  variables = weights.random_like(_abstract(model), seed=0)
  state = weights.export_state_dict(variables, resnet.torch_key_map(50, True))
  return model, variables, state


@pytest.mark.parametrize("depth,os_,size", [(50, 32, 64), (50, 16, 64), (50, 8, 64),
                                            (101, 16, 65), (101, 8, 65)])
def test_output_shapes(depth, os_, size):
  model = ResNet(depth, output_stride=os_)
  x = jnp.zeros((2, size, size, 3))
  feats = jax.eval_shape(model.apply, _abstract(model, size), x)
  s4 = -(-size // 4)
  sizes = {k: v.shape[1:] for k, v in feats.items()}
  assert sizes["layer1"] == sizes["stride4"] == (s4, s4, 256)
  n = -(-size // os_)
  assert sizes["out"] == sizes["layer4"] == (n, n, 2048)
  assert sizes["layer3"][-1] == 1024 and sizes[f"stride{os_}"] == (n, n, 2048)


def test_param_count_and_names(r50):
  _, variables, state = r50
  n = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert n == 25_557_032 - 2048 * 1000 - 1000 + 2048 * 10 + 10  # torchvision R50, 10-way fc.
  assert "layer4.2.bn3.running_var" in state and "layer1.0.downsample.0.weight" in state
  assert "layer2.1.downsample.0.weight" not in state
  assert len(state) == 320  # 53 convs + 53 BN x 5 keys + fc.weight/bias, as torchvision.


def test_round_trip_zip_and_safetensors(r50, tmp_path):
  model, variables, state = r50
  target = _abstract(model)
  # torchvision style: zip torch.save, wrapped and DataParallel-prefixed.
  path = str(tmp_path / "resnet50.pth")
  save_torch_file(path, {"state_dict": {"module." + k: v for k, v in state.items()}})
  loaded = weights.load_resnet(path, 50, with_classifier=True, target=target)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, variables))
  # timm style: .safetensors with the same names.
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  st_path = str(tmp_path / "resnet50.safetensors")
  safetensors_numpy.save_file(state, st_path)
  again = weights.export_state_dict(weights.load_resnet(st_path, 50, True, target),
                                    resnet.torch_key_map(50, True))
  assert set(again) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_strict_errors(r50):
  model, _, state = r50
  target = _abstract(model)
  key_map = resnet.torch_key_map(50, True)
  missing = {k: v for k, v in state.items() if k != "layer3.4.bn2.running_var"}
  with pytest.raises(weights.WeightsError, match=r"f\.pth: missing key 'layer3\.4\.bn2\."):
    weights.import_state_dict(missing, key_map, target, source="f.pth")
  extra = {**state, "layer5.0.conv1.weight": np.zeros((1,), np.float32)}
  with pytest.raises(weights.WeightsError, match="unexpected.*layer5.0.conv1.weight"):
    weights.import_state_dict(extra, key_map, target, source="f.pth")
  bad = {**state, "layer2.0.conv2.weight": np.zeros((128, 128, 1, 3), np.float32)}
  with pytest.raises(weights.WeightsError, match=r"layer2\.0\.conv2\.weight.*\(128, 128, 1, "
                                                 r"3\).*\(3, 3, 128, 128\)"):
    weights.import_state_dict(bad, key_map, target, source="f.pth")
  # The ImageNet fc is ignored unless asked for; an unfilled model variable is an error.
  no_fc = weights.import_state_dict(state, resnet.torch_key_map(50, False),
                                    _abstract(ResNet(50)), skip_prefixes=("fc.",))
  assert "fc" not in no_fc["params"]
  with pytest.raises(weights.WeightsError, match="no checkpoint key fills model variable "
                                                 "params/fc/"):
    weights.import_state_dict(state, resnet.torch_key_map(50, False), target,
                              skip_prefixes=("fc.",))


def test_load_pretrained_registry(r50, tmp_path):
  _, _, state = r50
  path = str(tmp_path / "r50.pth")
  save_torch_file(path, state)
  cfg = dict(backbone="resnet50", pretrained=True, weights_path=path, output_stride=16,
             norm="group", frozen_bn=True, pool="gap", dtype="float32")
  model = build_model(cfg, 21, "deeplab")
  variables = weights.random_like(_abstract(model), seed=5)
  loaded = load_pretrained(cfg, variables)
  assert set(loaded["params"]) == {"backbone", "decoder"}
  np.testing.assert_array_equal(loaded["params"]["backbone"]["layer3_2"]["conv2"]["kernel"],
                                state["layer3.2.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"],
                                state["bn1.running_var"])
  assert loaded["params"]["decoder"] is variables["params"]["decoder"]
  with pytest.raises(weights.WeightsError, match="weights_path=FILE.*pretrained=False"):
    load_pretrained({**cfg, "weights_path": ""}, variables)
  assert load_pretrained({**cfg, "pretrained": False}, variables) == variables


def test_bottleneck_frozen_bn():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 64)), jnp.float32)
  block = Bottleneck(16, stride=2, downsample=True, frozen_bn=True)
  variables = weights.random_like(jax.eval_shape(lambda: block.init(jax.random.key(0), x,
                                                                    False)))
  (out, upd) = block.apply(variables, x, True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, block.apply(variables, x, False), rtol=1e-5, atol=1e-5)
  assert out.shape == (2, 4, 4, 64)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), upd["batch_stats"],
                                   variables["batch_stats"]))


@pytest.mark.parametrize("os_,replace", [(16, (False, False, True)), (8, (False, True, True))])
def test_matches_torch_forward(r50, os_, replace):
  torch = pytest.importorskip("torch")
  _, variables, state = r50
  net = torch_baseline.torchvision_resnet(resnet.RESNET_LAYERS[50], replace)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()
                       if not k.startswith("fc.")}, strict=True)
  net.eval()
  x = np.random.default_rng(1).normal(size=(2, 3, 57, 61)).astype(np.float32)
  with torch.no_grad():
    ref_l1, ref_out = (t.numpy().transpose(0, 2, 3, 1) for t in net(torch.from_numpy(x)))
  model = ResNet(50, output_stride=os_)
  backbone = {c: {k: v for k, v in t.items() if k != "fc"} for c, t in variables.items()}
  feats = jax.jit(lambda v, x: model.apply(v, x))(backbone, x.transpose(0, 2, 3, 1))
  for got, ref in ((feats["layer1"], ref_l1), (feats["out"], ref_out)):
    assert got.shape == ref.shape
    rel = float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))
    assert rel < 1e-4, rel
