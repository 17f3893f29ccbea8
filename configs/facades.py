"""CMP Facades, labels -> photo (the official `facades` pix2pix dataset, A|B with A = photo).

Paper: 400 training images, 200 epochs, batch 1, jitter and mirroring.

  python -m p2p_jax.main --config=configs/facades.py --workdir=DIR \
      --config.data.data_dir=/path/to/facades
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.direction = 'BtoA'  # The files hold photo | labels.
  return config
