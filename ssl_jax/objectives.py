"""Objectives as data: a weighted sum of named loss terms chosen in the config.

An objective is a mapping `{term_name: {'weight': w, **term_params}}`. Each
term reads the network outputs it needs from a dict of [N, D] arrays:

  z_a, z_b   projections of the two views (every method)
  p_a, p_b   online predictions (BYOL family)
  t_a, t_b   target-network projections (BYOL family, no gradient)

Terms that are losses are added, entropy terms are subtracted (they are
maximised), so every weight is >= 0 and
  loss = sum_{loss terms} w * value - sum_{entropy terms} w * value.

The paper's methods (docs/method.md section 3) are entries of `METHODS`;
`method_terms(name)` returns a fresh copy to put in a config, where each
weight and parameter can be overridden from the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from ssl_jax import estimators
from ssl_jax import losses

Array = jax.Array
Outputs = Mapping[str, Array]

VIEW_MODES = ('per_view', 'concat')


def _view_keys(inputs: str) -> tuple[str, str]:
  losses.check_choice(inputs, 'inputs', ('z', 'p'))
  return f'{inputs}_a', f'{inputs}_b'


def _per_view(fn, outputs, inputs, reduce, axis_name, **params):
  """Applies a single-view statistic to both views and averages or sums."""
  losses.check_choice(reduce, 'reduce', ('mean', 'sum'))
  key_a, key_b = _view_keys(inputs)
  value_a, metrics_a = fn(outputs[key_a], axis_name=axis_name, **params)
  value_b, metrics_b = fn(outputs[key_b], axis_name=axis_name, **params)
  scale = 0.5 if reduce == 'mean' else 1.0
  metrics = {k: scale * (metrics_a[k] + metrics_b[k]) for k in metrics_a}
  return scale * (value_a + value_b), metrics


def _entropy(fn, outputs, inputs, mode, axis_name, **params):
  """Entropy per view (averaged) or of the concatenated batch [z_a; z_b]."""
  losses.check_choice(mode, 'mode', VIEW_MODES)
  if mode == 'per_view':
    return _per_view(fn, outputs, inputs, 'mean', axis_name, **params)
  key_a, key_b = _view_keys(inputs)
  losses.check_pair(outputs[key_a], outputs[key_b], (key_a, key_b), min_rows=1)
  # Under axis_name the local concatenation is gathered in a different row
  # order than the global one; entropy estimates are permutation invariant.
  z = jnp.concatenate([outputs[key_a], outputs[key_b]], axis=0)
  return fn(z, axis_name=axis_name, **params)


def _invariance(outputs, axis_name):
  return losses.invariance(outputs['z_a'], outputs['z_b'], axis_name=axis_name)


def _variance(outputs, axis_name, gamma=1.0, eps=1e-4, reduce='mean'):
  return _per_view(losses.variance, outputs, 'z', reduce, axis_name,
                   gamma=gamma, eps=eps)


def _covariance(outputs, axis_name, route='auto', reduce='sum'):
  return _per_view(losses.covariance, outputs, 'z', reduce, axis_name, route=route)


def on_sphere(z: Array, eps: float = 1e-12) -> Array:
  """Rows of z [N, D] rescaled to norm sqrt(D): a mean squared coordinate of 1."""
  norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  return z * jnp.sqrt(float(z.shape[-1])) / jnp.maximum(norm, eps)


def _logdet(outputs, axis_name, beta=1.0, normalizer='n', route='auto',
            mode='per_view', inputs='z', sphere=False):
  # sphere: the log-det grows without bound with the embeddings' scale, which
  # VICReg's invariance (a squared distance) holds in check but BYOL's cosine
  # loss does not: BYOL + LogDet on raw z diverged at every weight tried
  # (results/fmnist_compare). On the sphere of radius sqrt(D), the space
  # BYOL's loss lives in, scale is fixed and beta keeps VICReg's meaning.
  if sphere:
    key_a, key_b = _view_keys(inputs)
    outputs = {**outputs, key_a: on_sphere(outputs[key_a]), key_b: on_sphere(outputs[key_b])}
  return _entropy(estimators.logdet_entropy, outputs, inputs, mode, axis_name,
                  beta=beta, normalizer=normalizer, route=route)


def _pairwise(outputs, axis_name, sigma=1.0, sigma_mode='median', bound='upper',
              mode='per_view', inputs='z'):
  return _entropy(estimators.pairwise_entropy, outputs, inputs, mode, axis_name,
                  sigma=sigma, sigma_mode=sigma_mode, bound=bound)


def _barlow(outputs, axis_name, lambd=0.0051, scale=0.1, eps=1e-5, route='auto'):
  return losses.barlow_twins(outputs['z_a'], outputs['z_b'], lambd=lambd,
                             scale=scale, eps=eps, route=route, axis_name=axis_name)


def _nt_xent(outputs, axis_name, temperature=0.2):
  return losses.nt_xent(outputs['z_a'], outputs['z_b'], temperature=temperature,
                        axis_name=axis_name)


def _byol(outputs, axis_name):
  """Symmetrised: loss(p_a, t_b) + loss(p_b, t_a) (deepmind-research/byol)."""
  loss_ab, _ = losses.byol_regression(outputs['p_a'], outputs['t_b'], axis_name=axis_name)
  loss_ba, _ = losses.byol_regression(outputs['p_b'], outputs['t_a'], axis_name=axis_name)
  loss = loss_ab + loss_ba
  return loss, {'byol': loss}


@dataclasses.dataclass(frozen=True)
class Term:
  """A named loss term: how to compute it and how it enters the objective."""
  fn: Callable[..., tuple[Array, dict[str, Array]]]
  maximize: bool              # entropy terms are subtracted
  needs: tuple[str, ...]      # output keys it reads (before the 'inputs' switch)


TERMS: dict[str, Term] = {
    'invariance': Term(_invariance, False, ('z_a', 'z_b')),
    'variance': Term(_variance, False, ('z_a', 'z_b')),
    'covariance': Term(_covariance, False, ('z_a', 'z_b')),
    'logdet_entropy': Term(_logdet, True, ('z_a', 'z_b')),
    'pairwise_entropy': Term(_pairwise, True, ('z_a', 'z_b')),
    'barlow_twins': Term(_barlow, False, ('z_a', 'z_b')),
    'nt_xent': Term(_nt_xent, False, ('z_a', 'z_b')),
    'byol': Term(_byol, False, ('p_a', 'p_b', 't_a', 't_b')),
}

_VICREG_TERMS = {
    'invariance': {'weight': 25.0},
    'variance': {'weight': 25.0, 'gamma': 1.0, 'eps': 1e-4, 'reduce': 'mean'},
    'covariance': {'weight': 1.0, 'route': 'auto', 'reduce': 'sum'},
}
# Entropy-term defaults. The paper does not give w, beta or sigma (docs/method.md
# section 3: "choose defaults by a small sweep"); only vicreg_it's weight has
# been swept so far (README, "Default weights"); the rest are starting points.
_LOGDET = {'weight': 1.0, 'beta': 1.0, 'normalizer': 'n', 'route': 'auto',
           'mode': 'per_view', 'inputs': 'z', 'sphere': False}
_PAIRWISE = {'weight': 1.0, 'sigma': 1.0, 'sigma_mode': 'median', 'bound': 'upper',
             'mode': 'per_view', 'inputs': 'z'}

METHODS: dict[str, dict[str, dict[str, Any]]] = {
    'vicreg': _VICREG_TERMS,
    # w = 0.25: best of {1/16, 1/4, 1, 4} in the Fashion-MNIST default sweep (README).
    'vicreg_it': {'invariance': {'weight': 25.0}, 'logdet_entropy': {**_LOGDET, 'weight': 0.25}},
    'vicreg_pairdist': {'invariance': {'weight': 25.0}, 'pairwise_entropy': _PAIRWISE},
    'byol': {'byol': {'weight': 1.0}},
    'byol_logdet': {'byol': {'weight': 1.0}, 'logdet_entropy': _LOGDET},
    'byol_pairdist': {'byol': {'weight': 1.0}, 'pairwise_entropy': _PAIRWISE},
    'simclr': {'nt_xent': {'weight': 1.0, 'temperature': 0.2}},
    'barlow_twins': {'barlow_twins': {'weight': 1.0, 'lambd': 0.0051, 'scale': 0.1,
                                      'eps': 1e-5}},
}
_ENTROPY_METHODS = ('vicreg_it', 'vicreg_pairdist')


def method_terms(method: str, vicreg_terms: str = 'replace') -> dict[str, dict[str, Any]]:
  """A fresh copy of a method's terms, to be stored in (and edited by) a config.

  Args:
    method: a key of METHODS.
    vicreg_terms: for the VICReg-IT methods, 'replace' (default) drops VICReg's
      variance and covariance terms in favour of the entropy term; 'add' keeps
      them next to it. The paper's choice is uncertain (docs/method.md section 3).
  """
  losses.check_choice(method, 'method', tuple(METHODS))
  losses.check_choice(vicreg_terms, 'vicreg_terms', ('replace', 'add'))
  terms = copy.deepcopy(METHODS[method])
  if vicreg_terms == 'add':
    if method not in _ENTROPY_METHODS:
      raise ValueError(f"vicreg_terms='add' applies to {_ENTROPY_METHODS}, not {method!r}.")
    terms.update(copy.deepcopy({k: _VICREG_TERMS[k] for k in ('variance', 'covariance')}))
  return terms


def _as_dict(spec) -> dict[str, Any]:
  return spec.to_dict() if hasattr(spec, 'to_dict') else dict(spec)


def validate_terms(terms: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Checks names, weights and parameter names; returns plain dicts."""
  terms = _as_dict(terms)
  if not terms:
    raise ValueError('The objective has no terms; give at least one, e.g. '
                     "method_terms('vicreg').")
  out = {}
  for name, spec in terms.items():
    if name not in TERMS:
      raise ValueError(f'Unknown loss term {name!r}; known terms: {sorted(TERMS)}.')
    spec = _as_dict(spec)
    weight = spec.pop('weight', None)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
      raise ValueError(f'Term {name!r} needs a finite weight >= 0, got {weight!r}. '
                       'Entropy terms are maximised by the objective itself; '
                       'their weights are positive too.')
    allowed = set(inspect.signature(TERMS[name].fn).parameters) - {'outputs', 'axis_name'}
    unknown = set(spec) - allowed
    if unknown:
      raise ValueError(f'Term {name!r} has unknown parameters {sorted(unknown)}; '
                       f'it takes {sorted(allowed) + ["weight"]}.')
    out[name] = {'weight': float(weight), **spec}
  return out


def needed_outputs(terms: Mapping[str, Any]) -> set[str]:
  """The output keys an objective reads (tells the model what to compute)."""
  keys = set()
  for name, spec in validate_terms(terms).items():
    keys.update(TERMS[name].needs)
    if spec.get('inputs') == 'p':
      keys.update(('p_a', 'p_b'))
  return keys


def build_objective(terms: Mapping[str, Any]
                    ) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """Returns objective(outputs, axis_name=None) -> (loss, metrics).

  metrics holds 'loss', each term's raw value under its name, and each term's
  sub-metrics under '<term>/<metric>'.
  """
  terms = validate_terms(terms)

  def objective(outputs: Outputs, axis_name: Optional[str] = None):
    missing = needed_outputs(terms) - set(outputs)
    if missing:
      raise ValueError(f'The objective needs outputs {sorted(missing)} that the model '
                       f'did not produce (it gave {sorted(outputs)}); BYOL terms need '
                       'a predictor and a target network.')
    loss, metrics = 0.0, {}
    for name, spec in terms.items():
      params = {k: v for k, v in spec.items() if k != 'weight'}
      value, term_metrics = TERMS[name].fn(outputs, axis_name, **params)
      sign = -1.0 if TERMS[name].maximize else 1.0
      loss = loss + sign * spec['weight'] * value
      metrics[name] = value
      metrics.update({f'{name}/{k}': v for k, v in term_metrics.items() if k != name})
    metrics['loss'] = loss
    return loss, metrics

  return objective
