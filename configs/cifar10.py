"""CIFAR-10 as in the VDM paper (Kingma et al. 2021): the defaults of configs/default.py."""
from configs import default


def get_config():
  return default.get_config()
