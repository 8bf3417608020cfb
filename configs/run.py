"""The config a training run recorded in its workdir (its config.json), for evaluating, sampling
from or resuming that run with the settings it was trained with:

`python -m vdm.main --config=configs/run.py:/tmp/quickstart --workdir=/tmp/quickstart --mode=eval`

The argument after the colon is the run's workdir or its config.json. The recorded values are laid
over configs/default.py, so overrides (`--config.eval.num_batches=...`) work as with any config,
and keys added to vdm after the run keep their defaults. config.json is the newest record: a
resume that changed a free setting kept the one before as config.<its time>.json.
"""
import os

import ml_collections

from configs import default
from vdm import checkpoint as ckpt_lib


def get_config(path: str = "") -> ml_collections.ConfigDict:
  if not path:
    raise ValueError("configs/run.py reads a run's recorded config: pass "
                     "--config=configs/run.py:WORKDIR (the run's workdir or its config.json).")
  recorded = os.path.join(path, ckpt_lib.RUN_CONFIG) if os.path.isdir(path) else path
  saved = ckpt_lib.read_config_json(
      recorded, ": pass a run's workdir or the config.json that training wrote there.")
  config = default.get_config()
  known = ckpt_lib.config_items(config)
  unknown = sorted(saved.keys() - known.keys())
  if unknown:
    raise ValueError(f"{recorded} has keys this vdm does not know ({', '.join(unknown[:3])}"
                     f"{' and more' if len(unknown) > 3 else ''}): use the vdm version that "
                     "trained the run.")
  config.update_from_flattened_dict(saved)
  return config
