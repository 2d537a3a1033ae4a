"""ssl_jax: information-theoretic self-supervised learning in JAX/Flax."""

import setuptools

setuptools.setup(
    name='ssl_jax',
    version='0.1.0',
    description='VICReg, VICReg-IT (log-det / pairwise-distance entropy), BYOL, '
                'SimCLR and Barlow Twins in JAX/Flax, from a CPU to a TPU pod.',
    packages=setuptools.find_packages(include=['ssl_jax', 'ssl_jax.*', 'configs']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'tensorflow-cpu>=2.18',
        'tensorflow-datasets>=4.9.7',
        'tensorboard',  # tf.summary needs it; tensorflow-cpu no longer depends on it
        'ml-collections>=1.0',
        'chex>=0.1.90',
        'absl-py',
        'importlib_resources',  # tensorflow-datasets imports it without declaring it
        'numpy',
        'matplotlib',
        'tqdm',
        'scikit-learn',   # the embedding map's t-SNE
    ],
    extras_require={
        # pytest-randomly shuffles the test order (a seed is printed), so that a test that
        # depends on another's leftovers fails at once; mutmut: docs/development.md.
        'test': ['pytest>=8', 'pytest-xdist', 'pytest-randomly', 'scipy'],
        'mutation': ['mutmut>=3.8'],
        # benchmarks/train_step.py --torch: the same step in PyTorch, side by side.
        'bench': ['torch'],
        # Loading a `python -m ssl_jax.export` backbone into torchvision (and its test).
        'torch': ['torch', 'torchvision', 'safetensors'],
    },
)
