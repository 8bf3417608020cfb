"""The command line: train / eval / sample end to end, resuming, and one-line errors (exit 2)."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import subprocess_env  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.data.image_size=4", "--config.data.channels=1",
    "--config.data.synthetic_num_train=64", "--config.data.synthetic_num_test=16",
    "--config.model.n_layer=1", "--config.training.batch_size=8", "--config.eval.batch_size=8",
    "--config.training.log_every=2", "--config.training.eval_every=4",
    "--config.training.sample_every=4", "--config.training.checkpoint_every=2",
    "--config.sampling.num_steps=2", "--config.sampling.num_samples=4",
]


def _cmd(workdir, *args, config="configs/quickstart.py"):
  return [sys.executable, "-m", "vdm.main", f"--config={config}", f"--workdir={workdir}", *args]


def _run(cmd, timeout=600, **env):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=subprocess_env(**env))


def _json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def test_train_eval_sample_end_to_end_and_resume(tmp_path, monkeypatch):
  """The runs compile into the workdir's own cache (not the suite's), and the resume loads every
  program the first run compiled: it compiled them all again before."""
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny programs too
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  workdir = str(tmp_path / "run")
  cached = lambda: set(os.listdir(os.path.join(workdir, "xla_cache")))
  r = _run(_cmd(workdir, *TINY, "--config.training.num_steps=4"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 4/4" in r.stderr and "steps/s" in r.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  programs = cached()
  assert {p.split("-")[0] for p in programs} >= {"jit_train_step", "jit_eval_step", "jit_sample"}
  assert os.path.isfile(os.path.join(workdir, "samples", "step_4.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  summary = _json(workdir, "train_eval.json")
  assert summary["step"] == 4 and np.isfinite(summary["bpd"])

  # Resume to step 6 in the same workdir.
  r = _run(_cmd(workdir, *TINY, "--config.training.num_steps=6"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step 4." in r.stderr and "step 6/6" in r.stderr
  assert cached() == programs

  # Another run's config in this workdir is refused, in one line, and the record is kept.
  for args, shown in [(["--config.seed=7", "--config.optimizer.b1=0.5"],
                       "optimizer.b1=0.9 (now 0.5), seed=0 (now 7)"),
                      (["--mode=eval", "--config.data.vocab_size=16"], "data.vocab_size=256 (now 16)")]:
    r = _run(_cmd(workdir, *TINY, *args))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and f"holds a run with {shown}" in lines[0], r.stderr
    assert lines[0].endswith(f"(--config=configs/run.py:{workdir}) or a fresh --workdir."), lines
  assert _json(workdir, "config.json")["seed"] == 0

  # That run's own config, read back from its config.json: no overrides needed.
  r = _run(_cmd(workdir, "--mode=eval", "--config.eval.num_batches=1",
                config=f"configs/run.py:{workdir}"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval.num_batches=1 limits training's periodic evals; --mode=eval evaluates the whole" in (
      r.stderr)  # it was ignored without a word
  result = _json(workdir, "eval_6.json")
  assert result["num_examples"] == 16 and result["params"] == "ema"
  # the EMA parameters, as training's eval at that step (the raw ones give another bound)
  assert result["bpd"] == pytest.approx(_json(workdir, "train_eval.json")["bpd"], rel=1e-6)
  assert (result["model_dtype"], result["eval_fp32_fraction"], result["eval_seed"]) == (
      "float32", 0.0, 1) and result["commit"], result  # the share used: none in fp32 (config 0.3)
  assert result["checkpoint"] == os.path.abspath(workdir)
  for key in ("bpd", "bpd_stderr", "prior", "diffusion", "reconstruction"):
    assert np.isfinite(result[key]), key
  assert abs(result["prior"] + result["diffusion"] + result["reconstruction"] - result["bpd"]) < 1e-3

  r = _run(_cmd(workdir, *TINY, "--mode=sample", "--sampler=ddim", "--num_steps=3", "--num_samples=5",
                f"--checkpoint={os.path.join(workdir, 'checkpoints', '4')}"))
  assert r.returncode == 0, r.stderr[-3000:]
  npz = np.load(os.path.join(workdir, "samples", "ddim_3steps_step4_seed0.npz"))["samples"]
  assert npz.shape == (5, 4, 4, 1) and npz.dtype == np.uint8
  assert os.path.isfile(os.path.join(workdir, "samples", "ddim_3steps_step4_seed0.png"))
  r = _run(_cmd(workdir, *TINY, "--mode=sample", "--sampler=ddim", "--num_steps=3", "--num_samples=2",
                f"--checkpoint={os.path.join(workdir, 'checkpoints', '4')}"))
  assert r.returncode == 0, r.stderr[-3000:]  # another count, the same name: the first is kept
  kept = [f for f in os.listdir(os.path.join(workdir, "samples")) if f.startswith("ddim_3steps_step4_seed0.")]
  assert len(kept) == 4 and "exists: kept it as" in r.stderr, (kept, r.stderr[-3000:])
  assert np.load(os.path.join(workdir, "samples", "ddim_3steps_step4_seed0.npz"))["samples"].shape[0] == 2

  # The remedy Diverged names: resume with a lower learning rate and clipping (the optimizer's
  # state does not depend on either); the change is logged and recorded.
  r = _run(_cmd(workdir, *TINY, "--config.training.num_steps=7", "--config.optimizer.grad_clip=1.0",
                "--config.optimizer.learning_rate=0.001"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stderr and "step 7/7" in r.stderr
  assert ("with optimizer.grad_clip=1.0 (was 0.0), optimizer.learning_rate=0.001 (was 0.002)"
          in r.stderr), r.stderr[-3000:]
  assert _json(workdir, "config.json")["optimizer"]["learning_rate"] == 0.001
  # What steps 1 to 4 and 5 to 6 ran with is kept, not overwritten (config.<time>.json).
  earlier = [_json(workdir, f) for f in os.listdir(workdir)
             if f.startswith("config.") and f != "config.json"]
  assert sorted((c["training"]["num_steps"], c["optimizer"]["learning_rate"]) for c in earlier) == [
      (4, 0.002), (6, 0.002)], earlier


BAD_INPUTS = {
    "unknown_key": (["--config.model.bogus=1", "--config.model.dropout=0.0"], {},
                    "unknown config key 'bogus' in --config.model.bogus: check"),
    "misspelt_key": (["--config.model.n_layerss=2", "--config.seed=3"], {},  # a close key exists
                     "unknown config key 'n_layerss' in --config.model.n_layerss (Did you mean "
                     "\"n_layer\" instead of \"n_layerss\"?): check"),
    "wrong_type": (["--config.training.batch_size=abc"], {}, "batch_size"),
    "gamma_order": (["--config.model.gamma_min=6.0"], {},
                    "model.gamma_min=6.0 must be < model.gamma_max=5.0"),
    "fp32_fraction": (["--config.model.eval_fp32_fraction=1.5"], {},
                      "model.eval_fp32_fraction=1.5 must be in [0, 1]"),
    "indivisible_batch": (["--config.training.batch_size=3"],
                          {"devices": 2},
                          "not divisible by the 2 devices"),
    "missing_checkpoint": (["--mode=eval"], {}, "no checkpoint"),
    "bad_checkpoint_path": (["--mode=sample", "--checkpoint=/nonexistent/ckpt"], {}, "does not exist"),
    "unwritable_workdir": (["WORKDIR_UNDER_FILE"], {}, "not a writable directory"),
    "missing_config": (["CONFIG=configs/nope.py"], {}, "could not be loaded"),
    "config_raises": (["CONFIG_TEXT=def get_config():\n  return undefined_name\n"], {},
                      "could not be loaded (NameError: name 'undefined_name' is not defined)"),
    "config_without_get_config": (["CONFIG_TEXT=x = 1\n"], {}, "defines no get_config()"),
    "config_argument": (["CONFIG=configs/quickstart.py:abc"], {},
                        "Error whilst parsing config file: TypeError: get_config() takes 0"),
    "config_json": (["CONFIG=/tmp/run/config.json"], {}, "is a JSON record, not a config file: "
                    "read a run's config.json with --config=configs/run.py:/tmp/run/config.json"),
    "run_config_missing": (["CONFIG=configs/run.py:/nonexistent"], {},
                           "cannot read /nonexistent (FileNotFoundError: [Errno 2] No such file or "
                           "directory: '/nonexistent'): pass a run's workdir"),
    "checkpoints_in_the_way": (["IN_THE_WAY=checkpoints"], {},
                               "checkpoints is in the way: the run writes a directory there"),
    "config_json_in_the_way": (["IN_THE_WAY=config.json"], {},
                               "config.json is in the way: the run writes a file there"),
    "sample_seed": (["--mode=sample", "--sample_seed=-1"], {}, "--sample_seed=-1 must be in [0, 2^32)"),
    "npz_shape": (["NPZ=shape"], {}, "has shape"),
    "npz_dtype": (["NPZ=dtype"], {}, "has dtype"),
    "npz_vocab": (["NPZ=vocab", "--config.data.vocab_size=8"], {}, "not below data.vocab_size=8"),
    "workdir_in_proc": (["WORKDIR=/proc/vdm_workdir"], {}, "not a writable directory"),
    "corrupt_checkpoint": (["CORRUPT_CHECKPOINT"], {}, "could not be restored"),
    "unreadable_record": (["TRUNCATED_CONFIG_JSON"], {},
                          "config.json (JSONDecodeError: Expecting property name enclosed in double "
                          "quotes: line 1 column 11 (char 10)), the config of the run whose "
                          "checkpoints are there: restore it, or use a fresh"),
    # a resume with a new learning rate on a workdir another run trains in: refused before the
    # config check's "Resuming ..." warning, which made a second line
    "locked_workdir": (["LOCKED", "--config.optimizer.learning_rate=0.001"], {},
                       "is in use by another training run"),
    "no_coordinator": (["--process_id=1"], {}, "jax.distributed.initialize failed"),
    "empty_test_split": (["--config.data.synthetic_num_test=0"], {}, "has no examples"),
    # config's num_steps=0: a run that wrongly accepted these flags would end at once, not after
    # the quickstart's 1,500 steps
    "sample_flag_in_train": (["--num_steps=10", "--config.training.num_steps=0"], {},
                             "--num_steps has no effect with --mode=train"),
    "checkpoint_in_train": (["--checkpoint=/tmp", "--config.training.num_steps=0"], {},
                            "--checkpoint has no effect with --mode=train"),
    "sample_flags_in_eval": (["--mode=eval", "--sampler=ddim", "--num_samples=2", "--sample_seed=3"],
                             {}, "--sampler, --num_samples, --sample_seed has no effect with "
                             "--mode=eval"),
    "positional_argument": (["extra", "--config.training.num_steps=0"], {},
                            "unexpected arguments 'extra': pass options as --name=value"),
    "zero_sample_steps": (["--mode=sample", "--num_steps=0"], {},  # not config.sampling.num_steps
                          "--num_steps=0 and --num_samples=64 must be >= 1"),
}
# Settings vdm.config_checks.validate refuses before any work, naming the key and the fix (vdm.main
# ends each such ValueError in one line with exit status 2, as the gamma_order case above shows end
# to end).
INVALID_SETTINGS = {
    "residual_dtype": ({"model.residual_dtype": "fp16"}, "unknown model.residual_dtype"),
    "narrow_residual": ({"model.residual_dtype": "bfloat16"},
                        "would round the residual stream of a float32 network"),
    "negative_unroll": ({"model.unroll": -1}, "model.unroll=-1 must be an integer >= 0"),
    "norm_impl": ({"model.norm_impl": "fused"}, "unknown model.norm_impl"),
    "norm_recompute_remat": ({"model.norm_impl": "recompute", "model.remat": "convs"},
                             "model.norm_impl='recompute' with model.remat='convs'"),
    "missing_npz": ({"data.source": "npz", "data.path": "/nonexistent/d.npz"}, "does not exist"),
    "unknown_source": ({"data.source": "ftp"}, "unknown data.source"),
    "negative_seed": ({"seed": -1}, "seed=-1 must be in [0, 2^32)"),
    "seed_beyond_32_bits": ({"seed": 2**32}, "seed=4294967296 must be in [0, 2^32)"),
    "eval_seed": ({"eval.seed": -1}, "eval.seed=-1 must be in [0, 2^32)"),
    "gamma_max_inf": ({"model.gamma_max": float("inf")}, "model.gamma_max=inf must be finite"),
    "channel_mult_empty": ({"model.channel_mult": ()}, "model.channel_mult=() must be a non-empty"),
    "channel_mult_zero": ({"model.channel_mult": (1, 0)},
                          "model.channel_mult=(1, 0) must be a non-empty tuple of integers >= 1"),
    "dropout": ({"model.dropout": 1.5}, "model.dropout=1.5 must be in [0, 1)"),
    "image_size_levels": ({"data.image_size": 6, "model.channel_mult": (1, 2, 2)},
                          "images of 6×6 for model.channel_mult=(1, 2, 2): the U-Net halves them 2 "
                          "times, so they must be multiples of 4; change data.image_size"),
    "eval_num_batches": ({"eval.num_batches": -1}, "eval.num_batches=-1 must be >= 0"),
    "sampling_steps": ({"sampling.num_steps": 0}, "sampling.num_steps=0 must be >= 1"),
    "sampling_samples": ({"sampling.num_samples": 0}, "sampling.num_samples=0 must be >= 1"),
    "sampling_off_the_grid": ({"model.num_timesteps": 999},  # quickstart samples in 100 steps
                              "sampling.num_steps=100 does not divide model.num_timesteps=999"),
    "eval_batch": ({"eval.batch_size": -8}, "eval.batch_size=-8 must be >= 1"),
    "uniform_mix": ({"loss.importance_uniform_mix": 0.0},
                    "loss.importance_uniform_mix=0.0 must be in (0, 1]"),
    "learning_rate": ({"optimizer.learning_rate": -1e-4},
                      "optimizer.learning_rate=-0.0001 must be finite and > 0"),
    "learning_rate_inf": ({"optimizer.learning_rate": float("inf")},
                          "optimizer.learning_rate=inf must be finite and > 0"),
    "adam_b2": ({"optimizer.b2": 1.0}, "optimizer.b2=1.0 must be in [0, 1)"),
    "ema_rate": ({"optimizer.ema_rate": 1.0}, "optimizer.ema_rate=1.0 must be in [0, 1)"),
    "adam_eps": ({"optimizer.eps": 0.0}, "optimizer.eps=0.0 must be finite and > 0"),
    "weight_decay": ({"optimizer.weight_decay": -0.01},
                     "optimizer.weight_decay=-0.01 must be finite and >= 0"),
    "weight_decay_inf": ({"optimizer.weight_decay": float("inf")},
                         "optimizer.weight_decay=inf must be finite and >= 0"),
    "grad_clip": ({"optimizer.grad_clip": -1.0}, "optimizer.grad_clip=-1.0 must be finite and >= 0"),
    "grad_clip_nan": ({"optimizer.grad_clip": float("nan")},
                      "optimizer.grad_clip=nan must be finite and >= 0"),
    "n_embd_zero": ({"model.n_embd": 0}, "model.n_embd=0 must be a positive multiple of 32"),
    "n_embd_32": ({"model.n_embd": 32}, "leaves one channel in each of GroupNorm's 32 groups"),
    "synthetic_size": ({"data.image_size": 2},
                       "data.source='synthetic' needs data.image_size >= 3"),
    "synthetic_num": ({"data.synthetic_num_train": 0}, "synthetic_num_test >= 1 (now 0, 512)"),
    "max_to_keep": ({"training.max_to_keep": 0}, "training.max_to_keep=0 must be >= 1"),
    "prefetch": ({"data.prefetch": 0}, "data.prefetch=0 must be >= 1"),
    "vocab_size": ({"data.vocab_size": 1}, "data.vocab_size=1 must be in [2, 256]"),
    "vocab_size_257": ({"data.vocab_size": 257}, "data.vocab_size=257 must be in [2, 256]"),
    "channels": ({"data.channels": 0}, "data.channels=0 must be >= 1"),
    "synthetic_num_test": ({"data.synthetic_num_test": 0}, "synthetic_num_test >= 1 (now 8192, 0)"),
    "schedule": ({"model.schedule": "cosine"}, "unknown model.schedule 'cosine'"),
    "decoder": ({"model.decoder": "logistic"}, "unknown model.decoder 'logistic'"),
    "negative_num_timesteps": ({"model.num_timesteps": -1}, "model.num_timesteps=-1 must be >= 0"),
    "model_dtype": ({"model.dtype": "fp16"}, "unknown model.dtype 'fp16'"),
    "bool_unroll": ({"model.unroll": True}, "model.unroll=True must be an integer >= 0"),
    "remat": ({"model.remat": "all"}, "unknown model.remat 'all'"),
    "weighting": ({"loss.weighting": "vlb"}, "unknown loss.weighting 'vlb'"),
    "sampler": ({"sampling.sampler": "heun"}, "unknown sampling.sampler 'heun'"),
    "dropout_one": ({"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    "negative_num_steps": ({"training.num_steps": -1}, "training.num_steps=-1 must be >= 0"),
    "max_nonfinite_steps": ({"training.max_nonfinite_steps": 0},
                            "training.max_nonfinite_steps=0 must be >= 1"),
    "log_every": ({"training.log_every": 0}, "training.log_every=0 must be >= 1"),
    "eval_every": ({"training.eval_every": 0}, "training.eval_every=0 must be >= 1"),
    "sample_every": ({"training.sample_every": 0}, "training.sample_every=0 must be >= 1"),
    "checkpoint_every": ({"training.checkpoint_every": 0}, "training.checkpoint_every=0 must be >= 1"),
    "train_batch": ({"training.batch_size": 0}, "training.batch_size=0 must be >= 1"),
}
NPZ_IMAGES = {"shape": np.zeros((4, 5, 5), np.uint8), "dtype": np.zeros((4, 8, 8, 3), np.float32),
              "vocab": np.full((4, 8, 8, 3), 9, np.uint8)}


@pytest.mark.ci_once  # vdm's own checks, many processes
def test_bad_input_exits_2_with_one_line(tmp_path):
  import contextlib  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from vdm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  held = contextlib.ExitStack()  # locks held by this process until every run has ended
  procs = {}
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  corrupt = tmp_path / "ckpt" / "5"
  corrupt.mkdir(parents=True)
  (corrupt / "_CHECKPOINT_METADATA").write_text("{truncated")
  for name, (args, env, _) in BAD_INPUTS.items():
    workdir, config = str(tmp_path / name), "configs/quickstart.py"
    if args == ["WORKDIR_UNDER_FILE"]:
      workdir, args = str(a_file / "sub"), []
    elif args and args[0].startswith("CONFIG="):
      config, args = args[0][len("CONFIG="):], []
    elif args and args[0].startswith("CONFIG_TEXT="):
      config = tmp_path / f"{name}.py"
      config.write_text(args[0][len("CONFIG_TEXT="):])
      config, args = str(config), []
    elif args and args[0].startswith("IN_THE_WAY="):  # a file where a directory goes, or the reverse
      in_the_way = os.path.join(workdir, args[0][len("IN_THE_WAY="):])
      os.makedirs(workdir)
      if in_the_way.endswith(".json"):
        os.makedirs(in_the_way)
      else:
        open(in_the_way, "w").close()
      args = []
    elif args and args[0].startswith("NPZ="):
      path = tmp_path / f"{args[0][4:]}.npz"
      np.savez(path, train_images=NPZ_IMAGES[args[0][4:]], test_images=NPZ_IMAGES[args[0][4:]])
      args = ["--config.data.source=npz", f"--config.data.path={path}", *args[1:]]
    elif args and args[0].startswith("WORKDIR="):
      workdir, args = args[0][len("WORKDIR="):], []
    elif args == ["CORRUPT_CHECKPOINT"]:
      args = ["--mode=eval", f"--checkpoint={corrupt}"]
    elif args == ["TRUNCATED_CONFIG_JSON"]:
      os.makedirs(os.path.join(workdir, "checkpoints", "2"))
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"data": {')
      args = []
    elif args and args[0] == "LOCKED":  # the quickstart's run, with checkpoints, held by this process
      os.makedirs(os.path.join(workdir, "checkpoints", "2"))
      ckpt_lib.record_run_config(importlib.import_module("configs.quickstart").get_config(), workdir)
      held.enter_context(ckpt_lib.workdir_lock(workdir))
      args = args[1:]
    procs[name] = subprocess.Popen(_cmd(workdir, *args, config=config), cwd=ROOT, env=subprocess_env(**env),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  with held:
    errs = {name: proc.communicate(timeout=max(deadline - time.time(), 1))[1]
            for name, proc in procs.items()}
  for name, proc in procs.items():
    err = errs[name]
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2, (name, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("vdm: error: "), (name, err[-2000:])
    assert BAD_INPUTS[name][2] in lines[0], (name, lines[0])
    assert "Traceback" not in err


@pytest.mark.parametrize("name", list(INVALID_SETTINGS))
def test_validate_config_names_the_key_and_the_fix(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from vdm import config_checks  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.quickstart").get_config()
  overrides, message = INVALID_SETTINGS[name]
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert message in str(error.value)


def test_validate_names_missing_keys_and_a_config_that_is_no_configdict():
  """A config written before a key existed, or a plain dict, is named as such, not met later as
  an AttributeError traceback."""
  import importlib  # pylint: disable=g-import-not-at-top
  from vdm import config_checks  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.quickstart").get_config()
  del config.model["norm_impl"]
  del config.eval["seed"]
  with pytest.raises(ValueError, match=r"the config lacks eval.seed, model.norm_impl: start from "
                                       r"configs/default.py's get_config\(\)"):
    config_checks.validate(config)
  with pytest.raises(ValueError, match="the config is a dict: get_config"):
    config_checks.validate({"data": {}})


@pytest.mark.slow
def test_full_quickstart_beats_uniform_bits(tmp_path):
  """The documented quickstart: minutes on 2 CPU cores, test bound clearly below 8 bits/dim."""
  workdir = str(tmp_path / "quickstart")
  t0 = time.time()
  r = _run(_cmd(workdir), timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = _json(workdir, "train_eval.json")
  print(f"quickstart: {time.time() - t0:.0f} s, test bound {summary['bpd']:.3f} bits/dim")
  assert summary["bpd"] < 6.5


@pytest.mark.parametrize("name", ["cifar10", "cifar10_aug", "cifar10_bf16", "imagenet32", "imagenet64",
                                  "quickstart"])
def test_configs_load_and_validate(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from vdm import config_checks  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.validate(config)
  if name.startswith("cifar10"):
    m, o = config.model, config.optimizer
    assert (m.n_embd, m.n_layer, m.dropout, m.fourier_features, m.attention) == (128, 32, 0.1, True, False)
    assert (m.schedule, m.num_timesteps, config.training.batch_size) == ("learned_linear", 0, 128)
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.warmup_steps, o.ema_rate, o.grad_clip) == (
        2e-4, 0.9, 0.99, 0.01, 100, 0.9999, 0.0)
    assert config.data.random_flip == (name == "cifar10_aug")
    # What the H100 curve ran as configs/cifar10.py with overrides (experiments/RESULTS.md).
    assert (m.dtype, m.residual_dtype, m.unroll, m.remat, m.eval_fp32_fraction) == (
        ("bfloat16", "bfloat16", 0, "none", 0.3) if name == "cifar10_bf16"
        else ("float32", "float32", 4, "convs", 0.3))
  if name.startswith("imagenet"):  # the published VDM code's ImageNet models
    assert config.data.name == f"imagenet_resized/{name[-2:]}x{name[-2:]}"
    assert config.data.eval_split == "validation"
    m = config.model
    assert (m.n_embd, m.n_layer, tuple(m.channel_mult), m.dropout, config.training.batch_size) == (
        256, 32 if name == "imagenet32" else 64, (1,), 0.1, 128)


@pytest.mark.ci_once  # the configs' shapes; the quickstart trains through the same calls
@pytest.mark.parametrize("name", ["imagenet32", "imagenet64"])
def test_imagenet_configs_really_train(tmp_path, name):
  """Each ImageNet config, with its own data set name, splits and image size (64×64 also with a
  down-sampling level), trains, evaluates and samples through vdm.main on tfds's mocked data
  (offline); only the model's width and depth and the run's length are shrunk."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from vdm import config_checks, main  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  config.update_from_flattened_dict({
      "data.data_dir": str(tmp_path / "tfds"), "model.n_embd": 64, "model.n_layer": 1,
      "model.channel_mult": (1, 2) if name == "imagenet64" else (1,),
      "model.unroll": 0, "model.remat": "none", "training.batch_size": 4,
      "training.num_steps": 2, "training.log_every": 1, "training.eval_every": 2,
      "training.sample_every": 2, "training.checkpoint_every": 2, "eval.batch_size": 4,
      "eval.num_batches": 1, "sampling.num_steps": 2, "sampling.num_samples": 4})
  config_checks.validate(config)
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = main.run_train(config, workdir)
  size = config.data.image_size
  assert summary["step"] == 2 and summary["num_examples"] == 4 and np.isfinite(summary["bpd"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  samples = np.load(os.path.join(workdir, "samples", "step_2.npz"))
  assert any(a.shape == (4, size, size, 3) for a in samples.values())


# ---------------------------------------------------------------- in-process checks of vdm.main --

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(config, workdir) of a 2-step in-process run with checkpoints at steps 1 and 2."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import main  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_steps=2, checkpoint_every=1, eval_every=2, sample_every=2)
  config.sampling.update(sampler="ddim", num_steps=3, num_samples=3)
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  main.run_train(config, workdir)
  return config, workdir


def test_run_train_refuses_a_workdir_holding_another_run(tmp_path):
  """Only the command line checked the config against the run's record: main.run_train (notebooks,
  tests) resumed a run with another seed, mixing two runs. It checks it itself now, holding the
  workdir, before any model or data is built."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import checkpoint as ckpt_lib, main  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_config(), str(tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "2"))
  ckpt_lib.record_run_config(config, workdir)
  config.seed += 1
  with pytest.raises(ValueError, match=rf"^{workdir} holds a run with seed={config.seed - 1} "
                     rf"\(now {config.seed}\): use that run's config"):
    main.run_train(config, workdir)


@pytest.mark.ci_once  # vdm.main's own control flow; test_train makes its jax calls
def test_training_samples_are_the_ema_samples_of_its_checkpoint(trained_run):
  """Training's samples at step N: config.sampling's sampler, steps and count, the EMA parameters
  and the key PRNGKey(N), i.e. what --mode=sample gives for that checkpoint with --sample_seed=N."""
  from vdm import main  # pylint: disable=g-import-not-at-top
  config, workdir = trained_run
  during = np.load(os.path.join(workdir, "samples", "step_2.npz"))["samples"]
  assert during.shape == (3, 4, 4, 1)
  png = main.run_sample(config, workdir, None, "ddim", 3, 3, seed=2)
  assert png.endswith("ddim_3steps_step2_seed2.png")
  np.testing.assert_array_equal(np.load(png[:-3] + "npz")["samples"], during)
  other = main.run_sample(config, workdir, None, "ddim", 3, 3, seed=3)
  assert not np.array_equal(np.load(other[:-3] + "npz")["samples"], during)  # the seed is used


@pytest.mark.ci_once  # vdm.main's own control flow
def test_eval_reads_the_checkpoint_it_is_given(trained_run):
  """--checkpoint picks the step evaluated; sigma2_0/1 are the EMA schedule's at t = 0 and 1."""
  import jax  # pylint: disable=g-import-not-at-top
  from vdm import checkpoint, main  # pylint: disable=g-import-not-at-top
  from vdm.model import gamma_fn_for  # pylint: disable=g-import-not-at-top
  config, workdir = trained_run
  step_1 = os.path.join(workdir, "checkpoints", "1")
  summary = main.run_eval(config, workdir, step_1)
  assert (summary["step"], summary["checkpoint"], summary["num_examples"]) == (1, step_1, 16)
  assert _json(workdir, "eval_1.json")["bpd"] == summary["bpd"]
  main.run_eval(config, workdir, step_1)  # again: the first result is kept under another name
  assert len([f for f in os.listdir(workdir) if f.startswith("eval_1.")]) == 2
  model, params, _ = checkpoint.load_params(config, step_1)
  gamma = gamma_fn_for(model, params)(np.array([0.0, 1.0], np.float32))
  assert (summary["sigma2_0"], summary["sigma2_1"]) == pytest.approx(
      tuple(float(s) for s in jax.nn.sigmoid(gamma)), rel=1e-6)


def test_sample_refuses_bad_options_before_loading(tmp_path):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import main  # pylint: disable=g-import-not-at-top
  config, missing = tiny_config(), str(tmp_path / "no_run")
  for args, message in [(("heun", 2, 2), "unknown --sampler 'heun'"),
                        (("ddim", 0, 2), "--num_steps=0 and --num_samples=2 must be >= 1"),
                        (("ddim", 2, 0), "--num_steps=2 and --num_samples=0 must be >= 1")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      main.run_sample(config, missing, None, *args, seed=0)


def test_distributed_flag_alone_initializes(monkeypatch):
  """--distributed with no address, count or id still calls jax.distributed.initialize (which
  detects the cluster); with none of them it is not called."""
  import jax  # pylint: disable=g-import-not-at-top
  from vdm import main  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
  main.init_distributed(None, None, None)
  assert calls == []
  main.init_distributed(None, None, None, detect=True)
  assert calls == [(None, None, None)]


@pytest.mark.parametrize("name",
                         ["cifar10", "cifar10_aug", "cifar10_bf16", "imagenet32", "imagenet64"])
def test_paper_configs_keep_the_published_vdm_settings(name):
  """What test_configs_load_and_validate leaves out: google-research/vdm's configs/{cifar10,
  imagenet32,imagenet64}.py share this schedule, loss, optimizer and batch; the data matches the
  name, and sampling defaults to the usage line of vdm/main.py."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f"configs.{name}").get_config()
  m, o, d = c.model, c.optimizer, c.data
  assert (m.gamma_min, m.gamma_max, m.num_timesteps, m.antithetic_time_sampling, m.decoder) == (
      -13.3, 5.0, 0, True, "vdm")
  assert (c.loss.weighting, c.loss.time_sampling, m.variance_minimizing) == ("elbo", "uniform", False)
  assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps, o.ema_rate) == (
      2e-4, 0.9, 0.99, 1e-8, 0.01, 100, 0.9999)
  assert (c.training.batch_size, c.eval.batch_size, c.eval.seed) == (128, 128, 1)
  size = 64 if name == "imagenet64" else 32
  assert (d.source, d.image_size, d.channels, d.vocab_size, d.train_split) == (
      "tfds", size, 3, 256, "train")
  assert (d.name, d.eval_split) == (("cifar10", "test") if name.startswith("cifar10")
                                    else (f"imagenet_resized/{size}x{size}", "validation"))
  assert (c.sampling.sampler, c.sampling.num_steps, c.sampling.num_samples) == ("ancestral", 1000, 64)


@pytest.mark.ci_once  # the run record's handling
def test_run_config_reads_a_workdir_or_its_config_json_and_refuses_unknown_keys(trained_run,
                                                                                tmp_path):
  import importlib  # pylint: disable=g-import-not-at-top
  from vdm import checkpoint  # pylint: disable=g-import-not-at-top
  run_config = importlib.import_module("configs.run")
  config, workdir = trained_run
  for path in (workdir, os.path.join(workdir, "config.json")):
    assert checkpoint.config_items(run_config.get_config(path)) == checkpoint.config_items(config)
  newer = tmp_path / "config.json"
  newer.write_text(json.dumps({"model": {"bogus": 1, "n_layer": 1}}))
  with pytest.raises(ValueError, match=r"has keys this vdm does not know \(model.bogus\): use the"):
    run_config.get_config(str(newer))
  with pytest.raises(ValueError, match="pass --config=configs/run.py:WORKDIR"):
    run_config.get_config()  # --config=configs/run.py with no path: not a missing argument
  newer.write_text("[1]")  # JSON, but no config: it was reported as an unknown config key
  with pytest.raises(ValueError, match=r"cannot read .*config.json \(ValueError: a JSON list, not an "
                     r"object\): pass a run's"):
    run_config.get_config(str(newer))


def test_prepare_workdir_needs_one_and_names_what_is_in_the_way(tmp_path):
  from vdm import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="--workdir is required"):
    main.prepare_workdir("")
  for name in ("samples", "tensorboard"):  # checkpoints and config.json: test_bad_input_exits_2...
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / name).write_text("")
    with pytest.raises(ValueError, match=f"{name} is in the way: the run writes a directory there"):
      main.prepare_workdir(str(workdir))
  assert main.prepare_workdir(str(tmp_path / "fresh")) == str(tmp_path / "fresh")
