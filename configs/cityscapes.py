"""Cityscapes label map -> street photo (the paper's cityscapes labels->photo), from TFDS.

Download `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
https://www.cityscapes-dataset.com into MANUAL_DIR; the first run builds the TFDS dataset
(array_record) into DATA_DIR. Label ids are drawn in the official Cityscapes colours; both
images are resized to 256x256. Paper: 2975 training images, 200 epochs, batch 1.

  python -m p2p_jax.main --config=configs/cityscapes.py --workdir=DIR \
      --config.data.manual_dir=MANUAL_DIR --config.data.data_dir=DATA_DIR
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cityscapes'
  return config
