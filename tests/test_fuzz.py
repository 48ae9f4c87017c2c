"""The parallelism fuzzer (`moe_jax.fuzz`): a fixed set of cases agrees with one device, a broken
mesh is reported with a config that reproduces it, and the drawing is a function of the seed."""
import json

import jax
import numpy as np
import pytest

from moe_jax import fuzz

# (seed, case index) pairs whose drawn cases together cover what CI must exercise (checked by
# test_ci_cases_cover_the_required_features): expert parallelism with each exchange, a tensor
# axis, gradient accumulation, capacity dispatch, Soft MoE and expert choice; all one-layer
# float32 models, which compile fastest. Picked by searching seeds 0..399 for such a set:
# Soft MoE on fsdp x tensor, ReLU routing with the ragged exchange, token choice with capacity and
# the all-gather exchange on expert x tensor, expert choice with all-to-all on data x fsdp x expert.
CI_CASES = ((3, 0), (35, 0), (157, 0), (382, 0))
REQUIRED = {"exchange:all_to_all", "exchange:allgather", "exchange:ragged_all_to_all", "tensor",
            "grad_accum", "capacity", "router:soft", "router:expert_choice"}

# One train step per (config, device count), shared by the tests of this file: the broken-mesh test
# reuses the fixed cases' compilations.
_STEPS: dict[str, dict] = {}


@pytest.fixture
def memoized_steps(monkeypatch):
  original = fuzz.run_train_step

  def run(config, devices, fast_compile=True):
    key = json.dumps([fuzz._overrides_of(config), len(devices), fast_compile], sort_keys=True)
    if key not in _STEPS:
      _STEPS[key] = original(config, devices, fast_compile)
    return _STEPS[key]

  monkeypatch.setattr(fuzz, "run_train_step", run)
  return run


def test_ci_cases_cover_the_required_features():
  covered = set()
  for seed, index in CI_CASES:
    covered |= fuzz.features(fuzz.draw_case(seed, index).config())
  assert REQUIRED <= covered, f"re-pick CI_CASES: {sorted(REQUIRED - covered)} not covered"


def test_fixed_cases_agree_with_one_device(memoized_steps):
  lines = []
  for seed, index in CI_CASES:
    result = fuzz.fuzz([fuzz.draw_case(seed, index)], seed=seed, log=lines.append)
    assert not result["failures"], "\n".join(lines)
  print("\n".join(lines))
  assert all(" PASS " in line for line in lines), lines


def test_a_broken_mesh_is_reported_with_its_reproducer(memoized_steps, monkeypatch, capsys,
                                                       tmp_path):
  """Gradients 1% off on the 8-device mesh: FAIL, the overrides that reproduce it, exit status 1."""
  def broken(config, devices, fast_compile=True):
    results = memoized_steps(config, devices, fast_compile)
    if len(devices) > 1:
      results = dict(results, grads=jax.tree.map(lambda g: g * 1.01, results["grads"]))
    return results

  monkeypatch.setattr(fuzz, "run_train_step", broken)
  seed, index = CI_CASES[0]
  out_file = tmp_path / "summary.json"
  status = fuzz.main([f"--seed={seed}", f"--case={index}", f"--json_out={out_file}"])
  output = capsys.readouterr().out
  assert status == 1
  assert f"case {index:3d} FAIL" in output
  assert f"python -m moe_jax.fuzz --seed={seed} --case={index}" in output
  summary = json.loads(out_file.read_text())
  [failure] = summary["failures"]
  assert failure["failed"] == ["grads"]  # Adam's step is scale-invariant: the params agree
  assert summary["worst"]["float32/grads"]["difference"] == pytest.approx(0.01, rel=1e-3)
  # The printed overrides rebuild exactly the drawn case.
  printed = output.split("--overrides='")[1].split("'")[0]
  assert json.loads(printed) == failure["overrides"] == fuzz.draw_case(seed, index).overrides


def test_drawing_is_deterministic_in_the_seed():
  first = [fuzz.draw_case(seed, i) for seed in (0, 5) for i in range(6)]
  again = [fuzz.draw_case(seed, i) for seed in (0, 5) for i in range(6)]
  assert first == again
  assert [c.overrides for c in first[:6]] != [c.overrides for c in first[6:]]
  # Case i of seed s draws from default_rng(s + i): case 1 of seed 4 is case 0 of seed 5.
  assert fuzz.draw_case(4, 1).overrides == fuzz.draw_case(5, 0).overrides


def test_overrides_rebuild_the_drawn_config():
  """A case's overrides on configs/default.py:tiny give the config that was drawn and validated."""
  for seed in range(8):
    case = fuzz.draw_case(seed, 0)
    rng = np.random.default_rng(seed)
    for _ in range(case.skipped + 1):
      drawn, variant = fuzz.draw_config(rng)
    assert variant == case.variant
    assert case.config().to_dict() == drawn.to_dict()
    assert fuzz._validate(case.config()) is None


def test_fuzzer_state_is_train_fresh_state():
  """The fuzzer's faster-compiled initial state is `train.fresh_state`'s, to ulps, sharded."""
  config = fuzz.draw_case(*CI_CASES[3]).config()  # expert choice on data x fsdp x expert
  mesh = fuzz.sharding.make_mesh(config.mesh)
  tx, _ = fuzz.train.make_optimizer(config.train)
  graphdef, state = fuzz.train.fresh_state(config, mesh, tx)
  fuzz_graphdef, fuzz_state = fuzz.train.fresh_state(config, mesh, tx,
                                                     compiler_options=fuzz.FAST_COMPILE)
  assert fuzz_graphdef == graphdef
  assert jax.tree.structure(fuzz_state) == jax.tree.structure(state)
  for ours, theirs in zip(jax.tree.leaves(fuzz_state), jax.tree.leaves(state)):
    assert ours.sharding == theirs.sharding
    # Unoptimised XLA:CPU code rounds the initialisers' arithmetic differently (ulps).
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)
