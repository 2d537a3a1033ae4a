"""The default VICReg-IT training step in PyTorch, for benchmarks/train_step.py --torch.

Same encoder (small CNN or CIFAR-stem ResNet-18: conv without bias, BatchNorm,
ReLU), projector (Linear-BN-ReLU blocks, last Linear without bias), batch and
image shapes as the ssl_jax config; channels_last memory format, eager mode.
The objective is the config's VICReg-IT: 25 * invariance - w * log-det entropy
(beta 1, 1/N covariance, per view, N x N Gram form since N < D), computed in
float32. Differences from the ssl_jax step, all small next to the network:
SGD with momentum instead of LARS, no online probe, and the two views are
given (ssl_jax augments on device, about 0.5% of its step).

torch is an optional benchmark dependency (`pip install -e '.[bench]'`), never
one of the package's.
"""

import time

import numpy as np
import torch
from torch import nn

from ssl_jax import input_pipeline
from ssl_jax import models


def _conv_bn_relu(cin, cout, stride):
  return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
          nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.body = nn.Sequential(*_conv_bn_relu(cin, cout, stride),
                              nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
    self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

  def forward(self, x):
    return torch.relu(self.body(x) + self.shortcut(x))


def encoder(config, in_channels: int) -> tuple[nn.Module, int]:
  name, width = config.name, config.get('width', 1.0)
  if name == 'small_cnn':
    chans = [max(1, int(c * width)) for c in models.small_cnn_channels(config)]
    layers, cin = [], in_channels
    for cout, stride in zip(chans, (1, 2, 2, 1)):
      layers += _conv_bn_relu(cin, cout, stride)
      cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), chans[-1]
  if name == 'resnet18' and config.get('stem', 'cifar') == 'cifar':
    base = max(1, int(64 * width))
    layers, cin = _conv_bn_relu(in_channels, base, 1), base
    for stage in range(4):
      for i in range(2):
        cout = base * 2 ** stage
        layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), cin
  raise ValueError(f'torch_step builds small_cnn and the CIFAR-stem resnet18, not {name!r}.')


def projector(in_features: int, spec) -> nn.Module:
  dims = models.parse_mlp_spec(spec)
  layers = []
  for width in dims[:-1]:
    layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    in_features = width
  return nn.Sequential(*layers, nn.Linear(in_features, dims[-1], bias=False))


def logdet_entropy(z: torch.Tensor, beta: float) -> torch.Tensor:
  """0.5 log det(I_N + beta zc zc^T / N) via a Cholesky factor (docs/method.md section 2)."""
  zc = z - z.mean(0, keepdim=True)
  n = z.shape[0]
  gram = torch.eye(n, dtype=z.dtype) + beta * (zc @ zc.T) / n
  return torch.log(torch.diagonal(torch.linalg.cholesky(gram))).sum()


class TorchStep:
  """A VICReg-IT step of `config`'s model in PyTorch on one fixed random batch."""

  def __init__(self, config):
    torch.manual_seed(0)
    spec = input_pipeline.get_spec(config.data.name)
    self.batch_size = config.data.batch_size
    terms = config.loss.terms
    self.inv_weight = terms.invariance.weight
    self.ent_weight = terms.logdet_entropy.weight
    self.beta = terms.logdet_entropy.beta
    enc, features = encoder(config.model.encoder, spec.channels)
    self.model = nn.Sequential(enc, projector(features, config.model.projector))
    self.model = self.model.to(memory_format=torch.channels_last)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                     weight_decay=1e-4)
    rng = np.random.default_rng(0)
    shape = (self.batch_size, spec.channels, spec.image_size, spec.image_size)
    self.views = [torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(
        memory_format=torch.channels_last) for _ in range(2)]
    self.time(1)  # warm-up

  def step(self) -> float:
    z_a, z_b = (self.model(x) for x in self.views)
    invariance = torch.mean(torch.square(z_a - z_b))
    entropy = 0.5 * (logdet_entropy(z_a, self.beta) + logdet_entropy(z_b, self.beta))
    loss = self.inv_weight * invariance - self.ent_weight * entropy
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
      loss = self.step()
    float(loss.detach())
    return (time.perf_counter() - start) / steps
