"""experiments/comm_model.py: byte formulas by hand, valid-only ranking, monotonicity, units."""
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import pytest

from configs import default, deepseek_like, mixtral_like, routers
from moe_jax import routing, targets
from moe_jax.dispatch import expert_capacity
from moe_jax.validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("comm_model",
                                               os.path.join(REPO, "experiments", "comm_model.py"))
cm = importlib.util.module_from_spec(_spec)
sys.modules["comm_model"] = cm  # dataclasses resolve string annotations through sys.modules
_spec.loader.exec_module(cm)

RECIPES = [(module, variant) for module in (mixtral_like, deepseek_like)
           for variant in ("v5p-64", "v5p-128", "h100x8", "h100x64")]


def small_config(dtype="float32", capacity_factor=1.25, group_size=0):
  """E=4, K=2, D=8; batch 8 x 16 tokens."""
  config = default.get_config("tiny")
  config.model.d_model = 8
  config.model.dtype = dtype
  config.model.moe.num_experts = 4
  config.model.moe.top_k = 2
  config.model.moe.capacity_factor = capacity_factor
  config.model.moe.group_size = group_size
  config.data.batch_size = 8
  config.data.seq_len = 16
  return config


# ------------------------------------------------------------------------------- byte formulas


def test_capacity_bytes_by_hand():
  # data=2 x expert=2: 4 batch shards -> 2 sequences = 32 tokens per device; groups of one sequence
  # (16 tokens) -> G_local = 2; C = ceil(1.25 * 16 * 2 / 4) = 10.
  out = cm.exchanged_bytes(small_config(), {"data": 2, "expert": 2}, "capacity_all_to_all")
  assert (out["tokens_per_device"], out["groups_per_device"], out["capacity"]) == (32, 2, 10)
  assert out["buffer_shape"] == (4, 2, 10, 8)
  per_device = 4 * 2 * 10 * 8 * 4  # E * G_local * C * D * itemsize = 2560 bytes
  assert out["per_device_bytes"] == per_device
  assert out["total_bytes"] == 4 * per_device  # num_devices = 4
  assert out["per_destination_bytes"] == per_device // 2  # E/ep experts' chunk
  assert out["sent_bytes_per_device"] == per_device // 2  # the other half stays
  assert out["combine_per_device_bytes"] == per_device  # float32 outputs, same shape


def test_capacity_bytes_bf16_dispatch_float32_combine_and_tensor_replicas():
  config = small_config(dtype="bfloat16", group_size=8)
  out = cm.exchanged_bytes(config, {"expert": 2, "tensor": 2}, "capacity_all_to_all")
  # expert=2: 2 batch shards -> 64 tokens, G_local = 8 groups of 8; C = ceil(1.25*8*2/4) = 5.
  assert (out["tokens_per_device"], out["groups_per_device"], out["capacity"]) == (64, 8, 5)
  assert out["per_device_bytes"] == 4 * 8 * 5 * 8 * 2
  assert out["combine_per_device_bytes"] == 4 * 8 * 5 * 8 * 4
  assert out["total_bytes"] == 4 * out["per_device_bytes"]  # tensor replicas exchange too


@pytest.mark.parametrize("factor,group,experts,top_k", [(1.1, 100, 10, 1), (1.0, 7, 3, 2),
                                                        (2.0, 5, 4, 3), (0.3, 16, 8, 1)])
def test_capacity_is_dispatch_expert_capacity(factor, group, experts, top_k):
  config = small_config(capacity_factor=factor, group_size=group)
  config.model.moe.num_experts = experts
  config.model.moe.top_k = top_k
  config.data.batch_size = 4
  config.data.seq_len = group * 2
  out = cm.exchanged_bytes(config, {"data": 1}, "capacity_all_to_all")
  assert out["capacity"] == expert_capacity(group, experts, top_k, factor)
  assert out["capacity"] == max(1, math.ceil(round(factor * group * top_k / experts, 6)))


def test_allgather_ragged_padded_bytes_by_hand():
  config = small_config(capacity_factor=None)
  sizes = {"fsdp": 2, "expert": 2}  # 32 tokens per device, ep = 2, 4 devices
  gather = cm.exchanged_bytes(config, sizes, "allgather")
  assert gather["per_device_bytes"] == 2 * 32 * 8 * 4  # ep * T_local * D * itemsize
  assert gather["sent_bytes_per_device"] == 1 * 32 * 8 * 4
  assert gather["combine_per_device_bytes"] == 2 * 32 * 8 * 4  # float32 partial outputs
  assert gather["metadata_per_device_bytes"] == 2 * 32 * 2 * 8  # int32 ids + float32 weights
  ragged = cm.exchanged_bytes(config, sizes, "ragged_all_to_all")
  assert ragged["per_device_bytes"] == 32 * 2 * 8 * 4  # T_local * K * D * itemsize
  assert ragged["sent_bytes_per_device"] == pytest.approx(32 * 2 * 8 * 4 / 2)  # (ep-1)/ep leaves
  padded = cm.exchanged_bytes(config, sizes, "padded_all_to_all")
  assert padded["per_destination_bytes"] == 32 * 2 * 8 * 4  # T_local * K rows per destination
  assert padded["per_device_bytes"] == 2 * padded["per_destination_bytes"]
  assert padded["ffn_rows_per_device"] == 2 * 32 * 2
  # Uniform routing: every mode computes T_local * K real rows.
  assert {gather["expected_rows_per_device"], ragged["expected_rows_per_device"],
          padded["expected_rows_per_device"]} == {64}


@pytest.mark.parametrize("router,extra,slots", [
    ("token_choice", {}, 2), ("random", {}, 2), ("relu", {}, 4), ("top_p", {}, 4),
    ("top_p", {"max_experts_per_token": 3}, 3), ("relu", {"num_zero_experts": 2}, 6),
    ("token_choice", {"num_null_experts": 4}, 2)])
def test_padded_exchange_counts_the_routers_slots(router, extra, slots):
  """K = the decision's slots per token (E' for ReLU and top-p), not top_k: T_local * K rows."""
  config = small_config(capacity_factor=None)
  config.model.moe.router = router
  config.model.moe.update(extra)
  assert routing.slots_per_token(config.model.moe) == slots
  out = cm.exchanged_bytes(config, {"fsdp": 2, "expert": 2}, "padded_all_to_all")
  assert out["slots_per_token"] == slots
  assert out["per_destination_bytes"] == 32 * slots * 8 * 4  # T_local * K * D * itemsize
  assert out["combine_per_destination_bytes"] == 32 * slots * 8 * 4
  assert out["metadata_per_device_bytes"] == 2 * 32 * slots * 4  # int32 ids [ep, T_local * K]
  gather = cm.exchanged_bytes(config, {"fsdp": 2, "expert": 2}, "allgather")
  assert gather["metadata_per_device_bytes"] == 2 * 32 * slots * 8
  assert gather["per_device_bytes"] == 2 * 32 * 8 * 4  # the tokens do not depend on K


def test_no_expert_parallelism_moves_nothing():
  config = small_config(capacity_factor=None)
  for mode in ("padded_all_to_all", "ragged_all_to_all", "allgather"):
    out = cm.exchanged_bytes(config, {"data": 4}, mode)
    assert out["sent_bytes_per_device"] == 0 and out["combine_sent_bytes_per_device"] == 0


def test_exchange_errors_are_clear():
  with pytest.raises(ValueError, match="capacity factor"):
    cm.exchanged_bytes(small_config(capacity_factor=None), {"expert": 2}, "capacity_all_to_all")
  with pytest.raises(ValueError, match="span devices"):  # 16 tokens per device, groups of 32
    cm.exchanged_bytes(small_config(group_size=32), {"data": 2, "expert": 4}, "capacity_all_to_all")
  with pytest.raises(ValueError, match="num_experts=4"):
    cm.exchanged_bytes(small_config(), {"expert": 8}, "allgather")
  with pytest.raises(ValueError, match="batch_size=8"):
    cm.exchanged_bytes(small_config(), {"data": 16}, "allgather")
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    cm.exchanged_bytes(small_config(), {"pipeline": 2}, "allgather")
  with pytest.raises(ValueError, match="is not one of"):
    cm.exchanged_bytes(small_config(), {"expert": 2}, "telepathy")


# ------------------------------------------------------------------------------- the traced layer
#
# The model's bytes against the collectives traced from the real expert-parallel layer (the
# machinery of tests/test_expert_parallel.py), for every router family of configs/routers.py.

# (variant, exchange, overrides of config.model.moe)
TRACED = [(variant, exchange, {}) for variant in (
    "token_choice", "token_choice_capacity", "expert_choice", "top_p", "relu", "random",
    "moe_plus_plus", "null") for exchange in ("all_to_all", "allgather")] + [
    # Expert choice's own capacity C = ceil(1.25 * N / E) on position groups of N = 8 tokens.
    ("expert_choice", "all_to_all", {"capacity_factor": 1.25}),
    ("relu", "all_to_all", {"capacity_factor": 1.0}),  # K = E slots through capacity buffers
    ("top_p", "all_to_all", {"max_experts_per_token": 3}),
    ("relu", "allgather", {"num_zero_experts": 2}),  # E' = 10 slots, 8 of them FFN experts
]


def _traced_layer(variant, exchange, overrides):
  """(collectives of the EP forward as (primitive, per-device bytes), config, mesh sizes)."""
  import functools

  import jax
  from moe_jax import data, sharding, train
  from test_expert_parallel import _collectives, tiny_moe_config

  config = tiny_moe_config(None, exchange, data=2, expert=4)
  routers.apply_router(config, variant)
  config.model.moe.update(overrides)
  validate_config(config, num_devices=8)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, _ = train.build_model(config, mesh)
  router_state = train.init_router_state(config, mesh)
  batch = data.load_dataset(config.data, "train").train_batch(0, config.data.batch_size, 0)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(functools.partial(train.loss_fn, graphdef=graphdef))(
        params, batch, router_state=router_state)
  return _collectives(jaxpr.jaxpr), config, dict(mesh.shape)


@pytest.mark.parametrize("variant,exchange,overrides", TRACED,
                         ids=[f"{v}-{e}" + "".join(f"-{k}={x}" for k, x in o.items())
                              for v, e, o in TRACED])
def test_model_bytes_equal_the_traced_layers_collectives(variant, exchange, overrides):
  """Every collective the EP layer traces, byte for byte: tokens, routing metadata, outputs."""
  collectives, config, sizes = _traced_layer(variant, exchange, overrides)
  mode = cm.config_mode(config)
  expected = cm.exchanged_bytes(config, sizes, mode)
  by_kind = {kind: [size for k, size in collectives if k == kind]
             for kind in ("all_to_all", "all_gather", "reduce_scatter")}
  if mode == "allgather":  # tokens, then ids, weights (and capacity priorities); reduce-scatter
    assert not by_kind["all_to_all"], collectives
    assert by_kind["all_gather"][0] == expected["per_device_bytes"], (collectives, expected)
    assert sum(by_kind["all_gather"][1:]) == expected["metadata_per_device_bytes"], collectives
    assert by_kind["reduce_scatter"] == [expected["combine_per_device_bytes"]], collectives
  elif mode == "padded_all_to_all":  # tokens, local expert ids, outputs
    assert not by_kind["all_gather"] and not by_kind["reduce_scatter"], collectives
    assert by_kind["all_to_all"] == [expected["per_device_bytes"],
                                     expected["metadata_per_device_bytes"],
                                     expected["combine_per_device_bytes"]], (collectives, expected)
  else:  # capacity buffers out and back; no metadata
    assert by_kind["all_to_all"] == [expected["per_device_bytes"],
                                     expected["combine_per_device_bytes"]], (collectives, expected)


def test_soft_moe_has_no_ep_exchange_and_the_model_says_so():
  """Soft MoE's experts run under GSPMD: no shard_map collective is traced, and the model refuses
  rather than count an exchange the layer does not make."""
  collectives, config, sizes = _traced_layer("soft", "all_to_all", {})
  assert collectives == []
  for mode in ("padded_all_to_all", "allgather"):
    with pytest.raises(ValueError, match="router='soft' is not modelled"):
      cm.exchanged_bytes(config, sizes, mode)


# ------------------------------------------------------------------------------- time and units


def test_published_numbers_and_units():
  h100, v5p, v5e = (cm.TOPOLOGIES[n] for n in ("h100_sxm", "tpu_v5p", "tpu_v5e"))
  assert h100.peak_flops == 989e12  # FLOP/s, dense bf16
  assert h100.fast_bandwidth == 450e9  # bytes/s per direction: 900 GB/s NVLink both ways / 2
  assert h100.slow_bandwidth == 50e9  # 400 Gb/s NDR / 8 bits
  assert h100.hbm_bytes == 80e9
  assert (v5p.peak_flops, v5p.fast_bandwidth, v5p.hbm_bytes) == (459e12, 600e9, 95e9)
  assert (v5e.peak_flops, v5e.fast_bandwidth, v5e.hbm_bytes) == (197e12, 200e9, 16e9)


def test_collective_seconds_by_hand():
  switch = cm.Topology(name="t", peak_flops=1e12, hbm_bytes=1e9, fast_bandwidth=1e9,
                       fast_latency=0.0, fast_domain=4, slow_bandwidth=0.5e9, slow_latency=0.0)
  # 4 GB per device over 4 devices: 3 chunks of 1 GB leave at 1 GB/s.
  assert cm.all_to_all_seconds(4e9, 4, 4, switch) == pytest.approx(3.0)
  # 8 devices, 4 per host: 3 chunks of 0.5 GB on the fast link (1.5 s), 4 on the slow (4 s).
  assert cm.all_to_all_seconds(4e9, 8, 4, switch) == pytest.approx(4.0)
  assert cm.ring_seconds(4e9, 4, 4, switch) == pytest.approx(3.0)  # (n-1)/n of 4 GB
  assert cm.all_to_all_seconds(4e9, 1, 1, switch) == 0.0
  torus = cm.Topology(name="t", peak_flops=1e12, hbm_bytes=1e9, fast_bandwidth=1e9,
                      fast_latency=0.0, torus_dims=3)
  assert cm.torus_mean_hops(64, 3) == pytest.approx(3.0)  # 4x4x4: 3 dims x side 4 / 4
  assert cm.all_to_all_seconds(64e9, 64, 64, torus) == pytest.approx(63 * 3.0)
  assert cm.ring_seconds(4e9, 4, 4, torus) == pytest.approx(9.0)  # 1/3 of the links


def test_compute_time_is_flops_over_peak_and_backward_doubles_the_exchange():
  config = small_config(capacity_factor=None)
  config.model.remat = False
  config.model.moe.num_experts = 8
  topo = cm.TOPOLOGIES["h100_sxm"]
  sizes = {"expert": 8}  # 8 x 16 tokens over 8 devices: T_local = 16
  cost, out = cm.layer_cost(config, sizes, topo, "ragged_all_to_all")
  assert cost.compute_s == pytest.approx(cost.flops / topo.peak_flops)
  t_local, d, f, e, k = 16, 8, config.model.moe.expert_hidden_dim, 8, 2
  forward = 2 * 3 * t_local * k * d * f + 2 * t_local * d * e  # SwiGLU rows + router
  assert cost.flops == pytest.approx(3 * forward)  # forward + backward (2x)
  forward_bytes = out["sent_bytes_per_device"] + out["combine_sent_bytes_per_device"]
  assert cost.token_bytes == pytest.approx(2 * forward_bytes)
  config.model.remat = True
  remat_cost, _ = cm.layer_cost(config, sizes, topo, "ragged_all_to_all")
  assert remat_cost.flops == pytest.approx(4 * forward)
  assert remat_cost.token_bytes == pytest.approx(3 * forward_bytes)


def test_group_locality_follows_make_mesh_order():
  sizes = {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}  # 64 devices, 8 per host
  assert cm.group_locality(sizes, ("expert",), 8) == (8, 8)  # innermost: inside one host
  assert cm.group_locality(sizes, ("fsdp",), 8) == (8, 1)  # stride 8: one per host
  sizes = {"data": 2, "fsdp": 2, "expert": 8, "tensor": 2}
  assert cm.group_locality(sizes, ("expert",), 8) == (8, 4)  # stride 2 spans two hosts
  assert cm.group_locality(sizes, ("data", "expert"), None) == (16, 16)


# ------------------------------------------------------------------------------- ranking


def test_factorizations_are_complete_and_exact():
  combos = cm.factorizations(8)
  assert len(combos) == len(set(combos)) == 20  # C(3 + 3, 3) ways to split 2^3 over 4 axes
  assert all(math.prod(c) == 8 for c in combos)


@pytest.mark.parametrize("module,variant", [(mixtral_like, "v5p-64"), (deepseek_like, "v5p-128")])
def test_ranking_returns_only_valid_layouts_sorted(module, variant):
  config = module.get_config(variant)
  target = targets.get_target(variant)
  ranked = cm.rank_layouts(config, target.num_devices, cm.target_topology(target),
                           cm.configurable_modes(config))
  assert ranked
  every = {c for c in cm.factorizations(target.num_devices)}
  invalid = [c for c in every
             if cm.layout_problem(config, dict(zip(cm.MESH_AXES, c))) is not None]
  assert invalid  # the check has something to reject
  for estimate in ranked:
    sizes = estimate.sizes
    assert math.prod(sizes.values()) == target.num_devices
    assert tuple(sizes[a] for a in cm.MESH_AXES) not in invalid
    trial = config.copy_and_resolve_references()
    trial.mesh.update(sizes)
    validate_config(trial, num_devices=target.num_devices)
    assert config.model.moe.num_experts % sizes["expert"] == 0
  keys = [(not e.fits, e.step_s) for e in ranked]
  assert keys == sorted(keys)


def test_max_axis_limits_the_layouts():
  config = deepseek_like.get_config("h100x8")
  ranked = cm.rank_layouts(config, 8, cm.TOPOLOGIES["h100_sxm"], max_axis={"tensor": 1})
  assert ranked and all(e.sizes["tensor"] == 1 for e in ranked)


@pytest.mark.parametrize("module,variant", RECIPES[::3] + RECIPES[1::3])
def test_more_bandwidth_or_flops_never_increases_time(module, variant):
  config = module.get_config(variant)
  target = targets.get_target(variant)
  topo = cm.target_topology(target)
  faster_flops = dataclasses.replace(topo, peak_flops=topo.peak_flops * 2)
  for combo in cm.factorizations(target.num_devices)[::3]:
    sizes = dict(zip(cm.MESH_AXES, combo))
    if cm.layout_problem(config, sizes) is not None:
      continue
    for mode in cm.MODES:
      try:
        base = cm.estimate(config, sizes, topo, mode, capacity_factor=1.25)
      except ValueError:
        continue
      for scale in (1.5, 4.0):
        scaled = cm.estimate(config, sizes, topo.scaled(scale), mode, capacity_factor=1.25)
        assert scaled.step_s <= base.step_s + 1e-12
        assert scaled.layer.compute_s == base.layer.compute_s
      assert cm.estimate(config, sizes, faster_flops, mode,
                         capacity_factor=1.25).step_s <= base.step_s


@pytest.mark.parametrize("module,variant", RECIPES, ids=[f"{m.__name__}:{v}" for m, v in RECIPES])
def test_recipe_mesh_is_the_models_first_choice(module, variant):
  """The recipes say their mesh and exchange are the model's first pick; keep that true."""
  config = module.get_config(variant)
  target = targets.get_target(variant)
  best = cm.rank_layouts(config, target.num_devices, cm.target_topology(target),
                         cm.configurable_modes(config), memory_fraction=0.7,
                         max_axis={"tensor": 1})[0]
  assert best.fits
  assert best.sizes == {axis: config.mesh[axis] for axis in cm.MESH_AXES}
  assert best.mode == cm.config_mode(config)


def _run_main(*args):
  return subprocess.run([sys.executable, "experiments/comm_model.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_the_configured_layout_and_the_ranking():
  result = _run_main("--config=configs/deepseek_like.py:h100x8", "--modes=any",
                     "--max_axis=tensor=1", "--memory_fraction=0.7", "--top=3")
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 | 2 | 4 | 1 |")]
  # The configured row, the top of the ranking, and the allgather row of the mode comparison.
  assert len(rows) >= 3 and all("| allgather |" in r for r in rows[:2])
  assert "Every exchange on the best expert-parallel layout" in result.stdout


def test_cli_rejects_a_target_without_numbers():
  result = _run_main("--config=configs/mixtral_like.py:cpu8")
  assert result.returncode != 0 and "no interconnect numbers" in result.stderr
