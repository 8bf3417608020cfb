"""ImageNet 32x32 (tfds 'imagenet_resized/32x32'; its held-out split is 'validation')."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "imagenet_resized/32x32"
  config.data.eval_split = "validation"
  config.data.image_size = 32
  config.training.batch_size = 512
  config.eval.batch_size = 512
  return config
