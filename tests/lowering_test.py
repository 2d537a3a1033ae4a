"""The accelerator step, checked without an accelerator: jax.export for TPU and CUDA.

On the 8 fake CPU devices of the test session (conftest.py), the complete
training step of the pod config (ResNet-50, bfloat16, 8192-wide projector)
and of the CIFAR config is exported for 'tpu' and 'cuda', with the global
batch scaled down to what CI can afford. No dataset exists for either.
"""

import pytest

from ssl_jax import cli
from ssl_jax import conv
from ssl_jax import lowering
from ssl_jax import main as main_lib
from ssl_jax import sharding


def config_of(argument, *overrides):
  return cli.parse_command(main_lib.define_flags, ['ssl_jax.main', f'--config={argument}',
                                                   *overrides]).config.value


@pytest.mark.parametrize('argument, batch', [('configs/vicreg_it.py:imagenet', 64),
                                             ('configs/vicreg_it.py:cifar10', 32)])
def test_the_step_exports_for_tpu_and_cuda_with_xla_convolutions_and_the_gram_route(
    argument, batch, tmp_path):
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  config = config_of(argument, f'--config.data.batch_size={batch}',
                     f'--config.data.data_dir={tmp_path}')   # an empty folder: no data at all
  out = lowering.lower(config, ('tpu', 'cuda'), mesh)
  for platform, step in out.items():
    assert step.exported.platforms == (platform,) and step.exported.nr_devices == 8
    assert not step.uses_cpu_route, platform
    assert step.convolutions > 0
    # The log-det's batch statistics: one Cholesky per view, of the per-view
    # batch's [N, N] Gram matrix, since N < D.
    assert batch < step.embedding_width
    assert step.cholesky_sizes == [batch], (platform, step.cholesky_sizes)


def test_the_cpu_route_would_be_seen():
  """The check above can fail: a step built for the CPU carries the CPU route's scope."""
  config = config_of('configs/vicreg_it.py:smoke')
  mesh = sharding.make_mesh(1)
  with conv.target_platform('cpu'):
    step, state, batch, _ = lowering.abstract_step(config, mesh, 'cpu')
  text = step.lower(state, batch).as_text(debug_info=True)
  assert conv.CPU_ROUTE_SCOPE in text
  assert not lowering.lower(config, ('tpu',), mesh)['tpu'].uses_cpu_route
