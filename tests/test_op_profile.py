"""bench/op_profile.py: HLO parsing and op classification on hand-written cases, and one
real profiled function whose ops must be the compiled module's own. (`build_train_call`,
which `--what=profile` runs, is exercised by test_bench's real measured step.)"""
import jax
import jax.numpy as jnp
from jax import lax

from wsss_jax.bench import op_profile

HLO = """HloModule jit_step

%fused_computation.1 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp(Net))/backbone/conv1/dot_general"}
}

%wrapped (p: (f32[2], s32[2])) -> (f32[2], s32[2]) {
  %p = (f32[2]{0}, s32[2]{0}) parameter(0)
  ROOT %reduce-window.2 = (f32[2]{0}, s32[2]{0}) reduce-window(%p), window={size=2}
}

ENTRY %main.9 (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1
  %copy.4 = f32[2,4]{1,0} copy(%ynn_fusion.1), metadata={op_name="jit(step)/jvp(Net)/head/bn/transpose"}
  %wrapped_rw = (f32[2]{0}, s32[2]{0}) fusion(%copy.4), kind=kLoop, calls=%wrapped
  ROOT %add.5 = f32[4,2]{1,0} add(%ynn_fusion.1, %ynn_fusion.1), metadata={op_name="jit(step)/add"}
}
"""


def test_parse_hlo_and_classify_hand_written_module():
  ops = op_profile.parse_hlo(HLO)
  fused = ops["ynn_fusion.1"]
  # The fusion carries no metadata of its own: it takes that of its fused dot.
  assert fused.opcode == "fusion" and "dot" in fused.called_opcodes
  assert op_profile.classify(fused) == ("matmul", "backward", "backbone/conv1")
  assert op_profile.classify(ops["copy.4"]) == ("copy/transpose", "forward", "head/bn")
  assert op_profile.classify(ops["add.5"]) == ("elementwise", "other", "")
  assert op_profile.classify(ops["wrapped_rw"]) == ("window/scatter", "unlabelled", "")
  assert {"a", "b", "param_0", "dot.3", "reduce-window.2"} <= set(ops)


def test_summarize_groups_by_pass_and_category():
  ops = [{"pass": "forward", "category": "matmul", "seconds": 0.5},
         {"pass": "forward", "category": "matmul", "seconds": 0.25},
         {"pass": "backward", "category": "matmul", "seconds": 1.0}]
  assert op_profile.summarize(ops) == [
      {"pass": "backward", "category": "matmul", "seconds": 1.0, "ops": 1},
      {"pass": "forward", "category": "matmul", "seconds": 0.75, "ops": 2}]


def test_profile_of_a_conv_gradient_names_its_convolutions(tmp_path):
  x = jnp.ones((2, 16, 16, 8))
  w = jnp.full((3, 3, 8, 8), 0.1)

  def loss(w, x):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y))

  fn = jax.jit(jax.value_and_grad(loss))
  compiled = fn.lower(w, x).compile()
  result = op_profile.profile(lambda: compiled(w, x), compiled, calls=2, warmup=1,
                              trace_dir=str(tmp_path))
  assert result["trace"].startswith(str(tmp_path)) and result["wall_s"] > 0
  names = set(op_profile.parse_hlo(compiled.as_text()))
  assert result["ops"] and all(r["op"] in names for r in result["ops"])
  assert all(r["seconds"] >= 0 and r["events"] >= 1 for r in result["ops"])
  seconds = [r["seconds"] for r in result["ops"]]
  assert seconds == sorted(seconds, reverse=True)
  convs = [r for r in result["ops"] if r["category"] == "convolution"]
  assert any(r["pass"] == "forward" for r in convs)  # y, the primal
  assert len(convs) >= 2  # and the weight gradient, a second convolution
  text = op_profile.format_profile(result, top=3)
  assert "convolution" in text and text.count("\n") >= 4

