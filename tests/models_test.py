"""Encoders, heads and their configuration errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from ssl_jax import models


def model_config(encoder, projector='64-64-32', predictor='16-32', **kw):
  return ml_collections.ConfigDict(dict(encoder=dict(name=encoder, **kw), projector=projector,
                                        predictor=predictor, dtype='float32'))


@pytest.mark.parametrize('name,stem,size,features', [
    ('resnet18', 'cifar', 32, 128), ('resnet34', 'cifar', 32, 128),
    ('resnet50', 'imagenet', 64, 512), ('small_cnn', 'cifar', 28, 64),
])
def test_encoder_output_shapes(name, stem, size, features):
  config = model_config(name, stem=stem, width=0.25)

  def forward():
    model = models.create_model(config, 3, with_predictor=True, seed=0)
    return model(jnp.ones((2, size, size, 3)), train=True)

  # Traced, not run: shapes need no arithmetic, and running the ResNets op by
  # op (each op compiled on its own) took 26-40 s of CI per network.
  out = jax.eval_shape(forward)
  assert out['features'].shape == (2, features)
  assert out['z'].shape == (2, 32) and out['p'].shape == (2, 32)
  model = nnx.eval_shape(lambda: models.create_model(config, 3, with_predictor=True, seed=0))
  assert model.encoder.out_features == features


def test_cifar_stem_keeps_resolution_and_imagenet_stem_reduces_it():
  cifar = models.ResNet(18, 3, stem='cifar', width=0.25, rngs=nnx.Rngs(0))
  imagenet = models.ResNet(18, 3, stem='imagenet', width=0.25, rngs=nnx.Rngs(0))
  assert cifar.conv.kernel_size == (3, 3) and imagenet.conv.kernel_size == (7, 7)
  x = jnp.ones((1, 32, 32, 3))
  assert cifar.conv(x).shape == (1, 32, 32, 16)       # stride 1, no max-pool
  assert imagenet.conv(x).shape == (1, 16, 16, 16)    # stride 2, then max-pool in __call__
  assert cifar(x, train=False).shape == imagenet(x, train=False).shape == (1, 128)


def test_projector_last_layer_has_no_bias_and_batchnorm_between():
  mlp = models.MLP(8, '16-16-4', last_bias=False, rngs=nnx.Rngs(0))
  assert mlp.out.bias is None and len(mlp.norms) == 2


def test_batchnorm_uses_batch_statistics_in_training():
  model = models.create_model(model_config('small_cnn', width=0.25), 1, with_predictor=False,
                              seed=0)
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  # In training mode the projector's hidden activations are batch-normalised:
  # doubling every input's scale leaves them unchanged up to BN's epsilon.
  z1 = model(x, train=True)['z']
  z2 = model(2 * x, train=True)['z']
  assert jnp.allclose(z1, z2, atol=1e-3)


@pytest.mark.parametrize('shape', [(64, 5, 5, 6), (32, 7)])
def test_batchnorm_equals_nnx_batchnorm_in_values_gradients_and_running_averages(shape):
  # models.BatchNorm replaces nnx.BatchNorm's backward pass with a closed
  # form; everything else must be nnx.BatchNorm's: outputs, gradients with
  # respect to input, scale and bias, the running averages, variable names.
  features = shape[-1]
  kx, ks, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = 3 + 2 * jax.random.normal(kx, shape)
  scale = 1 + 0.1 * jax.random.normal(ks, (features,))
  bias = 0.1 * jax.random.normal(kb, (features,))
  cotangent = jax.random.normal(kg, shape)
  results = {}
  for name, cls in (('nnx', nnx.BatchNorm), ('ours', models.BatchNorm)):
    layer = cls(features, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = scale, bias
    graphdef, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

    def loss(x, params, graphdef=graphdef, stats=stats):
      model = nnx.merge(graphdef, params, stats, copy=True)
      y = model(x, use_running_average=False)
      return jnp.sum(jnp.sin(y) * cotangent), (y, nnx.state(model, nnx.BatchStat))

    (_, (y, new_stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    results[name] = y, grads, new_stats
  (y_ref, g_ref, s_ref), (y, g, s) = results['nnx'], results['ours']
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  assert jax.tree.structure(s) == jax.tree.structure(s_ref)
  for a, b in zip(jax.tree.leaves((g, s)), jax.tree.leaves((g_ref, s_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Inference mode is nnx.BatchNorm's own code.
  layer = models.BatchNorm(features, rngs=nnx.Rngs(0))
  reference = nnx.BatchNorm(features, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer(x, use_running_average=True),
                                reference(x, use_running_average=True))


def test_batchnorm_gradients_match_finite_differences_in_float64():
  # All three outputs (y and the batch statistics) carry gradients here.
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (6, 3, 4), jnp.float64)
    scale = jnp.linspace(0.5, 1.5, 4)
    bias = jnp.linspace(-0.2, 0.2, 4)
    f = lambda x, s, b: models.batch_norm_train(x, s, b, 1e-5)
    check_grads(f, (x, scale, bias), order=1, modes=['rev'])


def test_small_cnn_channels_set_each_layer_width_times_the_multiplier():
  model = models.create_model(model_config('small_cnn', width=0.5, channels='8-16-32-48'), 1,
                              with_predictor=False, seed=0)
  assert [conv.kernel.shape[-1] for conv in model.encoder.convs] == [4, 8, 16, 24]
  assert model(jnp.ones((2, 28, 28, 1)), train=True)['features'].shape == (2, 24)
  # '' is the default 32-64-128-256.
  default = models.create_model(model_config('small_cnn', width=0.25, channels=''), 1,
                                with_predictor=False, seed=0)
  assert default.encoder.out_features == 64


@pytest.mark.parametrize('config,message', [
    (model_config('small_cnn', channels='8-16-32'), 'channels needs 4 widths'),
    (model_config('small_cnn', channels='8-16-x-32'), 'model.encoder.channels must look like'),
    (model_config('resnet18', channels='8-16-32-64'), 'applies to small_cnn only'),
    (model_config('vgg'), "Unknown encoder 'vgg'"),
    (model_config('resnet20'), 'ResNet depth must be one of'),
    (model_config('resnet18', stem='tiny'), "stem must be 'cifar' or 'imagenet'"),
    (model_config('small_cnn', projector='64-x'), 'MLP spec must look like'),
    (model_config('small_cnn', projector='64-0'), 'positive layer widths'),
    (model_config('small_cnn', predictor='16-8'), 'must end in the projection width 32'),
])
def test_bad_model_config(config, message):
  with pytest.raises(ValueError, match=message):
    models.create_model(config, 1, with_predictor=True, seed=0)
