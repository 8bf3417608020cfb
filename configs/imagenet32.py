"""ImageNet 32x32: the published VDM code's model (256 channels, 32 blocks, dropout 0.1) and
optimizer, batch 128.

Data: tfds 'imagenet_resized/32x32' (box-resized, Chrabaszcz et al. 2017; held-out split
'validation'). The paper's bits/dim are on 'downsampled_imagenet/32x32' (van den Oord et al. 2016),
whose download tfds can no longer reach: with that data prepared, set
--config.data.name=downsampled_imagenet/32x32; the two sets' bits/dim are not comparable.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "imagenet_resized/32x32"
  config.data.eval_split = "validation"
  config.data.image_size = 32
  config.model.n_embd = 256
  return config
