"""ImageNet 64x64 (tfds 'imagenet_resized/64x64'), with a down-sampling U-Net."""
from configs import imagenet32


def get_config():
  config = imagenet32.get_config()
  config.data.name = "imagenet_resized/64x64"
  config.data.image_size = 64
  config.model.channel_mult = (1, 2)
  return config
