"""The demo: grayscale -> colour on real photographs bundled with scikit-image (no download).

Sized for a laptop CPU (a few minutes on 2 cores): 64 px, a 6-level U-Net (unet_64) and a
70x70 PatchGAN with narrower layers. The dataset is written once to ~/.cache/p2p_jax/demo in
the aligned A|B format and read by the same loader as the real datasets; its val/test photos
are never seen in training. Watch `heldout/input_generated_target` in TensorBoard.

  python -m p2p_jax.main --config=configs/demo.py --workdir=/tmp/p2p_demo
  python -m p2p_jax.main --config=configs/demo.py --workdir=/tmp/p2p_demo --mode=eval
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'demo'
  config.data.data_dir = ''  # '' -> ~/.cache/p2p_jax/demo, written on first use.
  config.data.input_nc = 1  # The A halves are grayscale.
  config.model.netG = 'unet_64'
  config.model.ngf = 32
  config.model.ndf = 32
  config.data.load_size = 72
  config.data.crop_size = 64
  config.data.batch_size = 2
  config.data.num_workers = 0  # 18 small images: workers would cost more than they save.
  config.optim.n_epochs = 60
  config.optim.n_epochs_decay = 40
  config.log_every_steps = 50
  config.image_every_steps = 250
  config.checkpoint_every_steps = 250
  config.num_image_examples = 4
  return config
