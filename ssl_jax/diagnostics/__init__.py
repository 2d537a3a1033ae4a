"""Diagnostics: the paper's information quantities and its assumptions, tested.

One module per concern:
- information: entropy of Z, and I(Z; X) under the model Z | X ~ N(mu, Sigma),
  with the check that the data allow the model;
- locality: do noisy and augmented copies stay in the image's linear region;
- gaussianity: are one image's views Gaussian;
- generalisation: the probe's risks and the measurable terms of the bound;
- selection: label-free quantities against the probe over a grid;
- workdir: a run's network and data, every diagnostic of a checkpoint, and
  `python -m ssl_jax.diagnose --workdir=DIR`; monitor: the cheap subset the
  training loop logs; figures: plots and console text.
"""

from ssl_jax.diagnostics.figures import plot_diagnostics
from ssl_jax.diagnostics.figures import summary_text
from ssl_jax.diagnostics.generalisation import generalisation_terms
from ssl_jax.diagnostics.information import information_quantities
from ssl_jax.diagnostics.information import REPRESENTATIONS
from ssl_jax.diagnostics import locality   # the module: locality.locality(...)
from ssl_jax.diagnostics.locality import pattern_agreement
from ssl_jax.diagnostics.monitor import make_training_monitor
from ssl_jax.diagnostics.selection import label_free_selection
from ssl_jax.diagnostics.selection import spearman_ci
from ssl_jax.diagnostics.workdir import FixedData
from ssl_jax.diagnostics.workdir import Network
from ssl_jax.diagnostics.workdir import Settings
from ssl_jax.diagnostics.workdir import diagnose_state
from ssl_jax.diagnostics.workdir import diagnose_workdir
from ssl_jax.diagnostics.workdir import fixed_images
from ssl_jax.diagnostics.workdir import run_beta
from ssl_jax.diagnostics.workdir import scalars_of
from ssl_jax.diagnostics.workdir import select_steps

__all__ = ['FixedData', 'Network', 'REPRESENTATIONS', 'Settings', 'diagnose_state',
           'diagnose_workdir', 'fixed_images', 'generalisation_terms', 'information_quantities',
           'label_free_selection', 'locality', 'make_training_monitor', 'pattern_agreement',
           'plot_diagnostics', 'run_beta', 'scalars_of', 'select_steps', 'spearman_ci',
           'summary_text']
