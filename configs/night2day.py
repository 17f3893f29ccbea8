"""Night <-> day (the official `night2day` pix2pix dataset).

Paper: 17823 training images, 17 epochs, batch 4, jitter and mirroring. AtoB translates the
left half of each file into the right half (the official default); pass
--config.dataset.direction=BtoA for the other way round.

  python -m p2p_jax.main --config=configs/night2day.py --workdir=DIR \
      --config.dataset.data_dir=/path/to/night2day
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.direction = 'AtoB'
  config.batch_size = 4
  config.n_epochs = 17
  config.n_epochs_decay = 0
  return config
