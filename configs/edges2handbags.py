"""Edges -> handbags (the official `edges2handbags` pix2pix dataset).

Paper: 137k training images, 15 epochs, batch 4, no random jitter or mirroring.

  python -m p2p_jax.main --config=configs/edges2handbags.py --workdir=DIR \
      --config.data.data_dir=/path/to/edges2handbags
"""
from configs import edges2shoes


def get_config():
  return edges2shoes.get_config()  # Same recipe; only --config.data.data_dir differs.
