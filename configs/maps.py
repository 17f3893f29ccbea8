"""Maps <-> aerial photos (the official `maps` pix2pix dataset).

Paper: 1096 training images, 200 epochs, batch 1, jitter and mirroring. AtoB is aerial photo
-> map; pass --config.dataset.direction=BtoA for map -> aerial photo.

  python -m p2p_jax.main --config=configs/maps.py --workdir=DIR \
      --config.dataset.data_dir=/path/to/maps
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.direction = 'AtoB'
  return config
