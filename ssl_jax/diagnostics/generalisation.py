"""Generalisation: the frozen-feature linear probe's risks and the bound's terms.

The paper's bound on a downstream probe's risk has an empirical risk, a term
in how far the probe's output moves between two views of an image (what the
invariance term controls), an information term and a concentration term.
What is measured here, and why each is what it claims to be:

- logit_shift = E ||W^T (g(x) - g(x'))||_2: the probe's logits' movement
  between two views, measured directly (g: the probe's standardised
  features, W [F, C]). The softmax cross-entropy is sqrt(2)-Lipschitz in its
  logits (its gradient p - e_y has norm <= sqrt(2)), so
  loss_shift_bound = sqrt(2) * logit_shift bounds E |loss(x) - loss(x')|.
  weight_norm_spectral * invariance_gap is the looser bound on logit_shift
  that uses only ||W||_2 (kept for comparison).
- No concentration term is computed on the probe's own training data: the
  probe depends on it, so Hoeffding's inequality does not apply there.
  Instead heldout_error_bound = test error + sqrt(log(1 / delta) / (2 n_test))
  bounds the probe's population 0-1 error with probability 1 - delta (the
  probe is fixed with respect to the held-out images), and `vacuous` says
  whether that is no better than guessing (>= 1 - 1 / classes).
- The information term's form is uncertain; it is not given a value.
"""

from __future__ import annotations

import math

import numpy as np

from ssl_jax import evaluate

LOSS_LIPSCHITZ = math.sqrt(2.0)   # softmax cross-entropy, in its logits, L2


def generalisation_terms(train: tuple[np.ndarray, np.ndarray],
                         test: tuple[np.ndarray, np.ndarray],
                         pairs: tuple[np.ndarray, np.ndarray], *, num_classes: int,
                         epochs: int = 30, delta: float = 0.05) -> dict[str, float]:
  """The probe's risks and the measurable terms (module docstring).

  Args:
    train, test: (features [M, F], labels [M]); the probe trains on train and
      is scored on test, which it never saw.
    pairs: (features of view a, of view b) [P, F] of unlabelled images.
  """
  probe = evaluate.linear_probe(*train, *test, num_classes=num_classes, epochs=epochs,
                                with_params=True)
  w = np.asarray(probe['params']['w'], np.float64)
  g_a = (pairs[0] - probe['mean']) / probe['std']
  g_b = (pairs[1] - probe['mean']) / probe['std']
  gap = float(np.mean(np.linalg.norm(g_a - g_b, axis=1)))
  logit_shift = float(np.mean(np.linalg.norm((g_a - g_b) @ w, axis=1)))
  spectral = float(np.linalg.norm(w, 2))
  n_test = len(test[1])
  test_error = 1.0 - probe['test_acc']
  bound = test_error + math.sqrt(math.log(1 / delta) / (2 * n_test))
  return {
      'train_error': 1.0 - probe['train_acc'], 'test_error': test_error,
      'error_gap': probe['train_acc'] - probe['test_acc'],
      'train_risk': probe['train_loss'], 'test_risk': probe['test_loss'],
      'risk_gap': probe['test_loss'] - probe['train_loss'],
      'weight_norm_fro': float(np.linalg.norm(w)), 'weight_norm_spectral': spectral,
      'invariance_gap': gap, 'spectral_term': spectral * gap,
      'logit_shift': logit_shift, 'loss_lipschitz': LOSS_LIPSCHITZ,
      'loss_shift_bound': LOSS_LIPSCHITZ * logit_shift,
      'heldout_error_bound': bound, 'delta': delta,
      'vacuous': float(bound >= 1.0 - 1.0 / num_classes),
      'probe_train_examples': len(train[1]), 'probe_test_examples': n_test,
  }
