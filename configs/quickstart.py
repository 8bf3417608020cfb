"""A minutes-long CPU run on procedurally generated 8x8 images: no download, any machine.

`python -m vdm.main --config=configs/quickstart.py --workdir=/tmp/quickstart`
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.source = "synthetic"
  config.data.image_size = 8
  config.data.channels = 3
  config.data.synthetic_num_train = 8192
  config.data.synthetic_num_test = 512
  config.model.n_embd = 64     # 2 channels per GroupNorm group: 32 would lose the γ conditioning
  config.model.n_layer = 1
  config.model.dropout = 0.0
  config.model.unroll = 0      # XLA:CPU differentiates loops slowly
  config.model.remat = "none"  # a tiny model: storing everything costs nothing, recomputing does
  config.optimizer.learning_rate = 2e-3
  config.optimizer.ema_rate = 0.99
  config.training.batch_size = 32
  config.training.num_steps = 1500
  config.training.log_every = 250
  config.training.eval_every = 1500
  config.training.sample_every = 1500
  config.training.checkpoint_every = 500
  config.eval.batch_size = 128
  config.sampling.num_steps = 100
  config.sampling.num_samples = 64
  return config
