"""The training step exported for accelerators, with its cost and predicted speed.

  python benchmarks/lower_step.py --config=configs/vicreg_it.py:imagenet --platforms=tpu,cuda
  python benchmarks/lower_step.py --config=configs/vicreg_it.py:cifar10 --devices=8 \
      --batch_per_device=32

Runs on a CPU-only machine: `jax.export` lowers the complete step (as
`python -m ssl_jax.main` would run it) for each platform over --devices fake
devices, with the global batch scaled down to devices x batch_per_device
(the per-image cost does not depend on it). It checks what ssl_jax.lowering
checks (XLA's own convolutions, the Gram route where the batch is smaller
than the embedding width), prints the step's FLOPs per image from XLA's cost
analysis, and the images/s per chip and step time of the config's own global
batch that 50% of each chip's published peak would give (bfloat16, or for a
float32 config the rate its matmuls run at by default).
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/vicreg_it.py:imagenet')
  parser.add_argument('--platforms', default='tpu,cuda')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch_per_device', type=int, default=8)
  parser.add_argument('--mfu', type=float, default=0.5)
  parser.add_argument('overrides', nargs='*', help='--config.x=y overrides')
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  sys.path.insert(0, ROOT)
  from ssl_jax import cli, lowering, sharding
  from ssl_jax import main as main_lib
  full = cli.parse_command(main_lib.define_flags, ['lower_step', f'--config={args.config}',
                                                   *args.overrides]).config.value
  batch = args.devices * args.batch_per_device
  scaled = cli.parse_command(main_lib.define_flags, [
      'lower_step', f'--config={args.config}', *args.overrides,
      f'--config.data.batch_size={batch}']).config.value
  mesh = sharding.make_mesh()
  print(f'{args.config}: {full.model.encoder.name}, projector {full.model.projector}, '
        f'{full.model.dtype}; exported with global batch {batch} on {mesh.size} devices '
        f'(the config trains with {full.data.batch_size})')
  out, seconds = {}, {}
  for platform in args.platforms.split(','):
    start = time.time()
    out.update(lowering.lower(scaled, [platform], mesh))
    seconds[platform] = time.time() - start
  for platform, step in out.items():
    gram = all(n < step.embedding_width for n in step.cholesky_sizes)
    print(f'  {platform}: exported in {seconds[platform]:.0f} s, {len(step.text) / 1e6:.1f} MB '
          f'of StableHLO, {step.convolutions} XLA convolutions, CPU conv route: '
          f'{"PRESENT" if step.uses_cpu_route else "none"}, Cholesky sizes '
          f'{step.cholesky_sizes} ({"Gram route" if gram else "covariance route"}; '
          f'embedding width {step.embedding_width})')
  flops = lowering.flops_per_image(scaled, mesh)
  print(f'  XLA cost analysis: {flops / 1e9:.2f} GFLOP per source image (both views, '
        'forward and backward, loss and optimiser)')
  peaks = lowering.peak_flops(full.model.dtype)
  print(f'  at {100 * args.mfu:.0f}% of the published dense peak for {full.model.dtype} '
        '(float32 matmuls run as one bfloat16 pass on TPU and as TF32 on an H100):')
  for chip, peak in peaks.items():
    rate = args.mfu * peak / flops
    step_time = full.data.batch_size / rate
    print(f'    {chip:9s} {peak / 1e12:6.1f} TFLOP/s peak, {rate:8.0f} images/s per chip; global '
          f'batch {full.data.batch_size}: {step_time * 1e3:.1f} ms/step on one chip, '
          f'{step_time / 8 * 1e3:.1f} ms on 8')


if __name__ == '__main__':
  main()
