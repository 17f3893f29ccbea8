"""The demo: labels -> facade photo, on pairs rendered from scikit-image's bundled textures.

Sized for a laptop CPU (3-4 minutes on 2 cores): 64 px, a 6-level U-Net (unet_64) and a
70x70 PatchGAN with narrower layers. The dataset (600 train, 16 val, 32 test random facade
layouts, see p2p_jax/demo_data.py) is written once to ~/.cache/p2p_jax/demo_facades in the
aligned A|B format and read by the same loader as the real datasets; val and test layouts
come from other seeds than train. Watch `val/L1` and `heldout/input_generated_target` in
TensorBoard; the best checkpoint by val L1 is kept.

  python -m p2p_jax.main --config=configs/demo.py --workdir=/tmp/p2p_demo
  python -m p2p_jax.main --config=configs/demo.py --workdir=/tmp/p2p_demo --mode=eval \
      --config.eval.step=best
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'demo'
  config.data.data_dir = ''  # '' -> ~/.cache/p2p_jax/demo_facades, written on first use.
  config.model.netG = 'unet_64'
  config.model.ngf = 32
  config.model.ndf = 32
  config.data.load_size = 64  # No crop jitter: 600 distinct layouts, and flips.
  config.data.crop_size = 64
  config.data.batch_size = 2
  config.data.num_workers = 0  # Small PNGs: workers would cost more than they save.
  config.optim.n_epochs = 4
  config.optim.n_epochs_decay = 2
  config.log_every_steps = 100
  config.image_every_steps = 300
  config.checkpoint_every_steps = 300
  config.eval_every_steps = 300  # The 16 val layouts: val/L1, PSNR, SSIM; best kept.
  config.num_image_examples = 4
  return config
