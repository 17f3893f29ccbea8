"""Night <-> day (the official `night2day` pix2pix dataset).

Paper: 17823 training images, 17 epochs, batch 4, jitter and mirroring. AtoB translates the
left half of each file into the right half (the official default); pass
--config.data.direction=BtoA for the other way round.

  python -m p2p_jax.main --config=configs/night2day.py --workdir=DIR \
      --config.data.data_dir=/path/to/night2day
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.batch_size = 4
  config.optim.n_epochs = 17
  config.optim.n_epochs_decay = 0
  return config
