"""The training step lowered for an accelerator, on a machine that has none.

`jax.export` lowers a jitted function for any platform ('tpu', 'cuda') from
abstract inputs, so the step a pod will run can be checked here: it must
lower, use XLA's own convolutions (not the CPU routes of ssl_jax/conv.py:
'auto' resolves for the target, see conv.target_platform), and compute its
batch statistics by the Gram route (an [N, N] Cholesky, not [D, D]) where
the per-step batch is smaller than the embedding width. No dataset is read:
the dataset's shape comes from its spec, the model is built abstractly.

  python benchmarks/lower_step.py --config=configs/vicreg_it.py:imagenet \
      --platforms=tpu,cuda
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import export

from ssl_jax import conv
from ssl_jax import models
from ssl_jax import runs
from ssl_jax import sharding
from ssl_jax import train

# Published dense bfloat16 peaks per chip, FLOP/s: TPU v4 (275 TFLOP/s) and
# v5e (197 TFLOP/s) from Google Cloud's TPU documentation, H100 SXM (989.4
# TFLOP/s) from NVIDIA's H100 datasheet.
PEAK_BF16 = {'TPU v4': 275e12, 'TPU v5e': 197e12, 'H100 SXM': 989.4e12}
# A float32 step's matmuls at JAX's default precision: one bfloat16 pass on
# TPU (the bfloat16 peak), TF32 on an H100 (494.7 TFLOP/s dense, the same
# datasheet): half the rate.
PEAK_FLOAT32 = {'TPU v4': 275e12, 'TPU v5e': 197e12, 'H100 SXM': 494.7e12}


def peak_flops(dtype: str) -> dict[str, float]:
  """Each chip's published dense peak for a step whose compute dtype is dtype."""
  return PEAK_BF16 if dtype == 'bfloat16' else PEAK_FLOAT32
# A Cholesky factorisation's operand: the op itself (TPU) or the function that
# wraps the solver call (cusolver on CUDA).
_CHOLESKY = re.compile(r'(?:stablehlo\.cholesky %[\w#]+, lower = true : '
                       r'|call @cholesky\w*\(%[\w#:]+\) : \()tensor<(\d+)x(\d+)x')


@dataclasses.dataclass
class LoweredStep:
  platform: str
  exported: Any                 # jax.export.Exported
  text: str                     # its StableHLO
  global_batch: int
  embedding_width: int

  @property
  def uses_cpu_route(self) -> bool:
    return conv.CPU_ROUTE_SCOPE in self.text

  @property
  def cholesky_sizes(self) -> list[int]:
    return sorted({int(m.group(1)) for m in _CHOLESKY.finditer(self.text)})

  @property
  def convolutions(self) -> int:
    return self.text.count('stablehlo.convolution')


def abstract_step(config, mesh, platform: str):
  """(jitted step, abstract state, abstract batch) of config, built for `platform`."""
  with conv.target_platform(platform):
    run = runs.build(config, mesh, abstract=True)
    step = train.make_step_fn(run, config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  size, channels = run.image_size, run.spec.channels
  batch = {'image': jax.ShapeDtypeStruct((run.global_batch, size, size, channels), jnp.uint8,
                                         sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((run.global_batch,), jnp.int32,
                                         sharding=batch_sharding)}
  if run.spec.variable_size:   # crops are taken on the host: the second view arrives ready
    batch['view_b'] = batch['image']
  return step, run.abstract_state(mesh), batch, run


def lower(config, platforms: Sequence[str], mesh=None) -> dict[str, LoweredStep]:
  """The config's complete training step exported for each platform."""
  mesh = mesh or sharding.make_mesh()
  out = {}
  for platform in platforms:
    step, state, batch, run = abstract_step(config, mesh, platform)
    exported = export.export(step, platforms=(platform,))(state, batch)
    out[platform] = LoweredStep(
        platform=platform, exported=exported, text=exported.mlir_module(),
        global_batch=run.global_batch,
        embedding_width=models.parse_mlp_spec(config.model.projector)[-1])
  return out


def flops_per_image(config, mesh=None) -> float:
  """XLA's cost analysis of the step (with XLA's own convolutions), per source image."""
  mesh = mesh or sharding.make_mesh()
  step, state, batch, run = abstract_step(config, mesh, 'tpu')
  cost = step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / run.global_batch
