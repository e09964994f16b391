"""The planner compiles the full-size SD1.5 step from shapes; its FLOPs match BRIEF §5."""

import pytest

from dpo_jax.tools import plan


@pytest.mark.parametrize("objective,expected_tflops_per_pair", [("dpo", 6.3)])
def test_sd15_plan_flops_match_the_brief(objective, expected_tflops_per_pair):
  from configs import sd15

  config = sd15.get_config()
  config.unlock()
  config.objective = objective
  r = plan.plan(config, "sd15", data=1, fsdp=1)
  # BRIEF §5: 0.79 TFLOP per 64x64 forward; a DPO pair = 8 forward-equivalents.
  assert r["flops_per_pair"] / 1e12 == pytest.approx(expected_tflops_per_pair, rel=0.15)
  assert 850e6 < r["unet_params"] < 870e6  # The 860M SD1.5 UNet.
  # fp32 master weights + two AdamW moments (+ count scalars) on one device.
  assert r["param_and_opt_bytes_per_device"] == pytest.approx(3 * 4 * r["unet_params"], rel=0.01)
  # bf16 reference.
  assert r["reference_bytes_per_device"] == pytest.approx(2 * r["unet_params"], rel=0.01)
  assert r["temp_bytes_per_device"] > 0
