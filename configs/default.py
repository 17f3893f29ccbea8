"""Official pix2pix defaults (junyanz/pytorch-CycleGAN-and-pix2pix, `--model pix2pix`).

unet_256 G, 70x70 PatchGAN D, batch norm, vanilla GAN, lambda_L1 = 100, Adam 2e-4 / beta1 0.5,
100 + 100 epochs with linear decay, load 286 / crop 256, flip, batch size 1.
Dataset configs import this file and override a few fields.

  python -m p2p_jax.main --config=configs/default.py --workdir=DIR \
      --config.data.data_dir=/path/to/facades --config.data.direction=BtoA
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A new run starts from these weights: a workdir (a run, or convert's output)[:STEP].
  config.init_from = ''
  config.init_keep_optimizer = False  # With init_from: keep its Adam moments too.

  config.data = ml_collections.ConfigDict()
  config.data.name = 'aligned'  # 'aligned' (A|B folders), 'cityscapes' (TFDS), 'demo'.
  config.data.data_dir = ''  # Aligned: DATA_DIR/{train,val,test}/*.jpg. TFDS: data dir.
  config.data.manual_dir = ''  # TFDS Cityscapes: where the downloaded zips are.
  config.data.direction = 'AtoB'  # 'AtoB' or 'BtoA'.
  config.data.train_split = 'train'
  config.data.eval_split = 'val'  # Held-out images shown in TensorBoard while training.
  config.data.skip_bad_images = False  # Skip (and log once) unreadable / malformed files.
  config.data.check_ab_shape = True  # Refuse A|B files whose width is not 2x height.
  config.data.input_nc = 3
  config.data.output_nc = 3
  # As the official `--preprocess`, `--load_size`, `--crop_size`, `--no_flip`.
  config.data.preprocess = 'resize_and_crop'
  config.data.load_size = 286
  config.data.crop_size = 256
  config.data.flip = True
  config.data.batch_size = 1  # Global, across all devices and processes.
  config.data.num_workers = 2  # grain worker processes per host (0: in the main process).
  config.data.prefetch_buffer_size = 4
  # Decode and resize each training file once (uint8, reused by later runs); only crop and
  # flip per epoch. Same batches as without it.
  config.data.cache = True
  config.data.cache_dir = ''  # '' -> $XDG_CACHE_HOME/p2p_jax/decoded (~/.cache/...).

  config.model = ml_collections.ConfigDict()
  config.model.netG = 'unet_256'  # 'unet_256', 'unet_128', 'resnet_9blocks', 'resnet_6blocks'.
  config.model.netD = 'basic'  # 'basic' (70x70), 'n_layers' (n_layers_D), 'pixel' (1x1).
  config.model.n_layers_D = 3
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.norm = 'batch'  # 'batch', 'instance', 'none'.
  config.model.use_dropout = True
  # 'auto': the exact CPU forms of p2p_jax/cpu_convs.py on CPU, plain lax convolutions on
  # GPU/TPU; 'fast' / 'plain' force either.
  config.model.conv_impl = 'auto'
  config.compute_dtype = 'float32'  # 'bfloat16': bf16 activations, fp32 params/optimizer.

  config.loss = ml_collections.ConfigDict()
  config.loss.gan_mode = 'vanilla'  # 'vanilla', 'lsgan', 'hinge'.
  config.loss.lambda_l1 = 100.0

  # Adam, constant LR for n_epochs, then linear decay to 0 over n_epochs_decay.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4
  config.optim.beta1 = 0.5
  config.optim.beta2 = 0.999
  config.optim.n_epochs = 100
  config.optim.n_epochs_decay = 100
  config.optim.num_train_steps = -1  # > 0 overrides the length (smoke runs).

  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  # Scores data.eval_split as --mode=eval does (val/L1, val/PSNR, val/SSIM in TensorBoard) and
  # keeps the best checkpoint by eval.best_metric; 0: off.
  config.eval_every_steps = 5000
  config.image_every_steps = 5000
  config.num_image_examples = 4  # Fixed train and held-out examples in the image grids.
  config.max_to_keep = 3
  config.profile = False  # Capture a jax.profiler trace early in training.

  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  config.eval.step = 'latest'  # 'latest', 'best' (by best_metric on the val scores) or a step.
  config.eval.best_metric = 'L1'  # 'L1' (lower is better), 'PSNR' or 'SSIM' (higher).
  config.eval.max_examples = -1  # Examples scored (eval and validation); -1: the whole split.
  config.eval.mode = 'paper'  # 'paper' (batch stats + dropout) or 'eval' (running stats).
  config.eval.num_samples = 1  # Stochastic samples per input in 'paper' mode.
  config.eval.batch_size = 1
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth: FID and KID in eval ('' = none).
  config.eval.inception_path = ''

  config.translate = ml_collections.ConfigDict()
  config.translate.input_dir = ''
  config.translate.output_dir = ''
  config.translate.resize = True  # Resize inputs to crop_size (and outputs back).
  config.translate.overwrite = False  # Replace existing files in output_dir.
  return config
