"""ImageNet 64x64: the published VDM code's model (256 channels, 64 blocks, no down-sampling,
dropout 0.1) and optimizer, batch 128.

Data as in configs/imagenet32.py at 64x64: 'imagenet_resized/64x64', or the paper's
'downsampled_imagenet/64x64' where prepared. ``--config.model.channel_mult='(1, 2)'`` gives a
down-sampling U-Net, far cheaper at this size.
"""
from configs import imagenet32


def get_config():
  config = imagenet32.get_config()
  config.data.name = "imagenet_resized/64x64"
  config.data.image_size = 64
  config.model.n_layer = 64
  return config
