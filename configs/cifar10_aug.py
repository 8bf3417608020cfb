"""CIFAR-10 with random horizontal flips."""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.random_flip = True
  return config
