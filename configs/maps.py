"""Maps <-> aerial photos (the official `maps` pix2pix dataset).

Paper: 1096 training images, 200 epochs, batch 1, jitter and mirroring. AtoB is aerial photo
-> map; pass --config.data.direction=BtoA for map -> aerial photo.

  python -m p2p_jax.main --config=configs/maps.py --workdir=DIR \
      --config.data.data_dir=/path/to/maps
"""
from configs import default


def get_config():
  config = default.get_config()
  return config
