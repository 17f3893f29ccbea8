"""Edges -> shoes (the official `edges2shoes` pix2pix dataset).

Paper: 50k training images, 15 epochs, batch 4, no random jitter or mirroring (the images
are already 256x256 halves, so load_size == crop_size is a plain resize).

  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=DIR \
      --config.data.data_dir=/path/to/edges2shoes
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.batch_size = 4
  config.optim.n_epochs = 15
  config.optim.n_epochs_decay = 0
  config.data.load_size = 256
  config.data.crop_size = 256
  config.data.flip = False
  return config
