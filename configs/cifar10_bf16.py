"""CIFAR-10 (configs/cifar10.py) in mixed precision, set up as it trained fastest on one H100.

bf16 layers and residual stream, fp32 parameters, optimizer, schedule and ELBO arithmetic; the
blocks fully unrolled with no rematerialisation (compiles in about a minute, 16 GiB of
temporaries at batch 128); evaluation runs the least noisy 30 % of each batch in fp32
(configs/default.py). For batch 512 add --config.model.remat=convs --config.model.unroll=4, the
setting measured at that batch. Figures: experiments/RESULTS.md.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  m = config.model
  m.dtype = "bfloat16"
  m.residual_dtype = "bfloat16"
  m.unroll = 0
  m.remat = "none"
  return config
