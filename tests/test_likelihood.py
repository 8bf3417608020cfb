"""Dataset ELBO evaluation: settings, standard errors, and the bound on a known distribution."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from vdm import elbo, importance, likelihood, schedules, toy

GAMMA = schedules.fixed_linear()
DATA = toy.FactorizedDiscrete.random(0, dims=3, vocab_size=4)


def _exact_bound_nats(dist, gamma_fn, order=200):
  """The expected continuous-time bound of the Bayes-optimal denoiser by quadrature: [D, V], the
  contribution of dimension d taking the value v (an example's bound sums its dimensions').

  With the exact E[ε|z_t] the diffusion loss telescopes (the reverse steps are the exact posteriors
  in the limit T → ∞): L_∞(x) = I_0(x) − I_1(x), I_t(x) = E_{q(z_t|x)}[log q(z_t|x) − log q(z_t)].
  So L(x) = KL(q(z_1|x) || N(0, I)) + I_0 − I_1 + E_{q(z_0|x)}[−log p(x|z_0)], a sum over the
  independent dimensions of 1-D Gaussian integrals (Gauss–Hermite, float64).
  """
  vocab = dist.vocab_size
  xv = 2.0 * (np.arange(vocab) + 0.5) / vocab - 1.0
  h, w = np.polynomial.hermite.hermgauss(order)
  w = w / math.sqrt(math.pi)
  logp = np.log(dist.probs)  # [D, V]
  g0, g1 = (float(g) for g in gamma_fn(jnp.array([0.0, 1.0])))
  alpha_sigma = lambda g: (math.sqrt(1 / (1 + math.exp(g))), math.sqrt(1 / (1 + math.exp(-g))))

  def info(g):  # [D, V]: I_t for x_d = v
    a, s = alpha_sigma(g)
    z = a * xv[:, None] + s * math.sqrt(2) * h  # [V, K] nodes of q(z_t | x_d = v)
    log_mix = logsumexp(logp[:, None, None, :] - 0.5 * ((z[None, ..., None] - a * xv) / s) ** 2, -1)
    return ((-0.5 * 2 * h**2 - log_mix) * w).sum(-1)  # the common −log(√(2π) σ) cancels

  a0, s0 = alpha_sigma(g0)
  logits = -0.5 * math.exp(-g0) * ((xv[:, None] + s0 / a0 * math.sqrt(2) * h)[..., None] - xv) ** 2
  recon = -((logits[np.arange(vocab), :, np.arange(vocab)] - logsumexp(logits, -1)) * w).sum(-1)
  a1, s1 = alpha_sigma(g1)
  kl_1 = 0.5 * (s1**2 + (a1 * xv) ** 2 - 1 - math.log(s1**2))
  return kl_1 + info(g0) - info(g1) + recon


def test_continuous_elbo_is_unbiased_for_the_exact_bound_of_the_bayes_denoiser():
  table = _exact_bound_nats(DATA, GAMMA)
  # Averaged over the data it bounds the entropy (Gibbs), and for this schedule tightly.
  gap = ((DATA.probs * table).sum() / (DATA.dims * math.log(2)) - DATA.entropy_bits_per_dim())
  assert 0 <= gap < 1e-3, gap
  x = DATA.sample(jax.random.PRNGKey(0), 4096)
  exact = table[np.arange(DATA.dims), np.asarray(x)].sum(-1)
  out = likelihood.elbo_samples(DATA.eps_fn(), GAMMA, x, jax.random.PRNGKey(1), vocab_size=4,
                                num_samples=128)
  diff = (np.asarray(out["total"], np.float64) - exact) / (DATA.dims * math.log(2))
  se = diff.std(ddof=1) / math.sqrt(diff.size)
  print(f"ELBO estimate − exact expected bound, per image: {diff.mean():+.4f} ± {se:.4f} bits/dim "
        f"(diffusion term {np.asarray(out['diffusion']).mean() / (DATA.dims * math.log(2)):.3f})")
  assert se < 0.01
  assert abs(diff.mean()) < 4 * se


def test_evaluate_elbo_reports_every_setting_with_se_from_per_image_means():
  x = np.asarray(DATA.sample(jax.random.PRNGKey(2), 256))
  batches = [x[:128], x[128:]]
  rng = jax.random.PRNGKey(3)
  params = importance.proposal_from_second_moment(np.ones(8))  # uniform: same bound
  res = likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, batches, rng, vocab_size=4,
                                 timesteps=(0, 1000), num_samples=4,
                                 time_proposals={"flat": importance.time_proposal(params)})
  assert set(res) == {"continuous", "T=1000", "continuous_flat"}
  # The SE is across images of each image's mean over its K draws, with the same keys per batch.
  per_image = np.concatenate([
      np.asarray(likelihood.elbo_samples(DATA.eps_fn(), GAMMA, jnp.asarray(b), jax.random.fold_in(rng, i),
                                         vocab_size=4, num_samples=4)["total"])
      for i, b in enumerate(batches)]) / (DATA.dims * math.log(2))
  stats = res["continuous"]
  assert stats["num_images"] == 256 and stats["num_samples"] == 4
  np.testing.assert_allclose(stats["bpd"], per_image.mean(), rtol=1e-5)
  np.testing.assert_allclose(stats["bpd_se"], per_image.std(ddof=1) / 16.0, rtol=1e-4)
  terms = stats["prior_bpd"] + stats["diffusion_bpd"] + stats["reconstruction_bpd"]
  np.testing.assert_allclose(terms, stats["bpd"], rtol=1e-5)
  # mc_std: the per-image sample variance (ddof 1) of the one-draw totals of the K draws.
  total_var = np.concatenate([
      np.var([np.asarray(elbo.total_nats(elbo.elbo_terms(DATA.eps_fn(), GAMMA, jnp.asarray(b), key,
                                                         vocab_size=4)), np.float64)
              for key in jax.random.split(jax.random.fold_in(rng, i), 4)], axis=0, ddof=1)
      for i, b in enumerate(batches)])
  np.testing.assert_allclose(stats["mc_std_bpd"], np.sqrt(total_var.mean()) / (DATA.dims * math.log(2)),
                             rtol=1e-5)
  # Continuous, T = 1000 and the flat proposal all estimate (nearly) the same bound.
  for name in ("T=1000", "continuous_flat"):
    diff = res[name]["bpd"] - stats["bpd"]
    assert abs(diff) < 4 * math.hypot(res[name]["bpd_se"], stats["bpd_se"]) + 0.01, name
    print(f"{name}: {res[name]['bpd']:.4f} ± {res[name]['bpd_se']:.4f} vs continuous "
          f"{stats['bpd']:.4f} ± {stats['bpd_se']:.4f}")


def test_single_sample_has_no_mc_std_and_bad_arguments_are_rejected():
  x = DATA.sample(jax.random.PRNGKey(4), 8)
  res = likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x], jax.random.PRNGKey(0), vocab_size=4)
  assert set(res) == {"continuous"} and math.isnan(res["continuous"]["mc_std_bpd"])
  with pytest.raises(ValueError, match="num_samples"):
    likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x], jax.random.PRNGKey(0), vocab_size=4, num_samples=0)
  with pytest.raises(ValueError, match="no data"):
    likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [], jax.random.PRNGKey(0), vocab_size=4)
  with pytest.raises(ValueError, match="vocab_size"):
    likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x], jax.random.PRNGKey(0), vocab_size=3)
  with pytest.raises(ValueError, match="num_timesteps"):
    likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x], jax.random.PRNGKey(0), vocab_size=4,
                             timesteps=(1000.7,))
  # The jitted entry points check their data before compiling, where its values are known.
  with pytest.raises(ValueError, match="outside"):
    likelihood.elbo_samples(DATA.eps_fn(), GAMMA, x + 4, jax.random.PRNGKey(0), vocab_size=4)
  with pytest.raises(ValueError, match="num_samples"):
    likelihood.elbo_samples(DATA.eps_fn(), GAMMA, x, jax.random.PRNGKey(0), vocab_size=4, num_samples=0)
  with pytest.raises(ValueError, match="outside"):
    importance.estimator_variance(DATA.eps_fn(), GAMMA, x + 4, jax.random.PRNGKey(0),
                                  importance.time_proposal(importance.proposal_from_second_moment(
                                      np.ones(8))), vocab_size=4, repeats=2)


def test_total_var_keeps_its_precision_when_the_totals_dwarf_their_spread():
  """total_var against the float64 variance of the same K one-draw totals. 64×64×3 images under a
  near-optimal denoiser total ~1.8e4 nats with an MC spread of ~15; Σv² − K·mean² in float32
  missed this by up to 2.7×."""
  x = jax.random.randint(jax.random.PRNGKey(1), (4, 64, 64, 3), 0, 256)
  gamma_fn = schedules.fixed_linear(-13.3, -3.5)

  def eps_fn(z, gamma):
    alpha, sigma = schedules.alpha_sigma(gamma[:, None, None, None])
    return 0.999 * (z - alpha * elbo.scale_data(x, 256)) / sigma

  rng, k = jax.random.PRNGKey(0), 16
  got = likelihood.elbo_samples(eps_fn, gamma_fn, x, rng, num_samples=k)
  totals = np.stack([np.asarray(elbo.total_nats(elbo.elbo_terms(eps_fn, gamma_fn, x, key)), np.float64)
                     for key in jax.random.split(rng, k)])
  assert totals.mean() > 1e4 and totals.std(0, ddof=1).min() > 5
  np.testing.assert_allclose(got["total"], totals.mean(0), rtol=1e-6)
  np.testing.assert_allclose(got["total_var"], totals.var(0, ddof=1), rtol=1e-3)


def test_batches_of_another_image_shape_and_decreasing_gamma_are_refused():
  x = DATA.sample(jax.random.PRNGKey(4), 8)
  with pytest.raises(ValueError, match=r"^batch 1 has 2 values per image \(shape \(8, 2\)\) but batch 0 has 3"):
    likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x, x[:, :2]], jax.random.PRNGKey(0), vocab_size=4)
  decreasing = lambda t: 5.0 - 18.3 * t
  with pytest.raises(ValueError, match="not increasing"):
    likelihood.difference_by_time(DATA.eps_fn(), DATA.eps_fn(), decreasing, [x], jax.random.PRNGKey(0),
                                  vocab_size=4)
  with pytest.raises(ValueError, match="not increasing"):
    importance.loss_moments(DATA.eps_fn(), decreasing, [x], jax.random.PRNGKey(0), vocab_size=4)


def test_a_short_last_batch_is_padded_into_the_first_batchs_program():
  """The dataset functions compiled each program again for a split's short last batch (the
  10,000 CIFAR-10 test images at batch 128 end in 16: a minute or more per program on a GPU).
  That batch is now padded to the first one's size and its padding masked out: one program per
  function, and the short batch's values are those it gets evaluated alone, antithetic times
  included. An empty batch is refused."""
  from conftest import compiled  # pylint: disable=g-import-not-at-top
  eps_fn = DATA.eps_fn()  # a new function: programs no other test compiled
  x, key = DATA.sample(jax.random.PRNGKey(5), 21), jax.random.PRNGKey(6)
  batches = [x[:8], x[8:16], x[16:]]
  names = compiled(lambda: (
      likelihood.evaluate_elbo(eps_fn, GAMMA, batches, key, vocab_size=4, num_samples=2),
      likelihood.difference_by_time(eps_fn, eps_fn, GAMMA, batches, key, vocab_size=4),
      importance.loss_moments(eps_fn, GAMMA, batches, key, vocab_size=4, num_bins=4)))
  for name in ("_elbo_samples", "_loss_differences", "_batch_moments"):
    assert names.count(name) == 1, (name, names)

  def totals(xb, k, keep):
    out = likelihood.elbo_samples(eps_fn, GAMMA, xb, k, vocab_size=4, num_samples=2, mask=keep)
    return np.asarray(out["total"])[np.asarray(keep)]

  padded = elbo.over_batches(batches, key, 4, totals)[0][2]
  alone = likelihood.elbo_samples(eps_fn, GAMMA, x[16:], jax.random.fold_in(key, 2), vocab_size=4,
                                  num_samples=2)["total"]
  np.testing.assert_allclose(padded, alone, rtol=1e-5)
  unpadded = elbo.over_batches(batches, key, 4, lambda xb, k, keep: (len(xb), int(keep.sum())),
                               pad=False)[0]
  assert unpadded == [(8, 8), (8, 8), (5, 5)]  # the ODE's batches: its step size sees all rows
  moments = importance.loss_moments(eps_fn, GAMMA, batches, key, vocab_size=4, num_bins=4)
  assert moments["num_images"] == 21
  with pytest.raises(ValueError, match=r"^batch 1 has no images \(shape \(0, 3\)\): drop it"):
    likelihood.evaluate_elbo(eps_fn, GAMMA, [x, x[:0]], key, vocab_size=4)


def test_one_array_for_batches_is_refused_with_the_fix():
  """An array given as ``batches`` would be iterated row by row, each row taken for a batch."""
  x = DATA.sample(jax.random.PRNGKey(4), 8)
  message = (r"^batches is one array of shape \(8, 3\): pass an iterable of \[B, \.\.\.\] batches, "
             r"e\.g\. \[x\] for one batch")
  for evaluate in (likelihood.evaluate_elbo, importance.loss_moments):
    with pytest.raises(ValueError, match=message):
      evaluate(DATA.eps_fn(), GAMMA, x, jax.random.PRNGKey(0), vocab_size=4)
  with pytest.raises(ValueError, match=message):
    likelihood.paired_difference(DATA.eps_fn(), DATA.eps_fn(), GAMMA, np.asarray(x), jax.random.PRNGKey(0),
                                 vocab_size=4)


@pytest.mark.ci_once  # the script's own checks, many processes
def test_experiment_script_refuses_flags_it_would_misread(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "likelihood.json"
  (tmp_path / "a_file").write_text("")
  # One line each, before any work: absl printed its usage text above a flag's error, a config
  # key error was a traceback, and --timesteps / --dequantization / --output failed only after
  # the sections before theirs had run.
  for args, words in ((["--num_images=0"], "--toy draws that many images"),
                      (["--batch_size=0"], "--batch_size=0 must be >= 1"),
                      (["--is_fit_batches=0"], "--is_fit_batches=0 must be >= 1"),
                      (["--timesteps=0,1k"], "--timesteps=0,1k must be integers >= 0"),
                      (["--dequantization=uniformm"], "--dequantization=uniformm: use some of"),
                      ([f"--output={tmp_path / 'a_file' / 'x.json'}"],
                       "--output's directory=" f"{tmp_path / 'a_file'} is not a writable directory"),
                      (["--notoy", "--config=configs/quickstart.py", "--config.model.n_embdd=64",
                        f"--workdir={tmp_path}"], "unknown config key 'n_embdd'")):
    r = subprocess.run([sys.executable, os.path.join(root, "experiments", "likelihood.py"), "--toy",
                        f"--output={out}", *args], capture_output=True, text=True, cwd=root)
    lines = [l for l in r.stderr.splitlines() if l.startswith("vdm: error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "USAGE" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and words in lines[0] and r.stderr.rstrip().endswith(lines[0]), r.stderr[-2000:]
  assert not out.exists()


@pytest.mark.ci_once  # the script's control flow for a discrete-time model; one process
def test_experiment_script_reports_a_discrete_time_models_own_bound(tmp_path):
  """likelihood.py on a model trained with T = 100 steps adds T=100 to --timesteps (given 0 alone
  here) and compares dtypes on that bound; its info names T, the decoder and the schedule. It
  had reported only the continuous and other-T bounds, each at times the model was never trained
  at, and a continuous-time dtype comparison, with nothing in the file saying so."""
  import json
  import os
  import subprocess
  import sys
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import main  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = tiny_config(num_steps=1, checkpoint_every=1, eval_every=1, sample_every=1)
  config.model.num_timesteps = 100
  config.sampling.num_steps = 10
  workdir, out = str(tmp_path / "run"), tmp_path / "likelihood.json"
  main.run_train(config, workdir)
  r = subprocess.run([sys.executable, os.path.join(root, "experiments", "likelihood.py"),
                      f"--config=configs/run.py:{workdir}", f"--workdir={workdir}",
                      f"--output={out}", "--num_images=8", "--batch_size=8", "--timesteps=0",
                      "--noimportance", "--ode_num_images=0", "--compare_dtype=bfloat16"],
                     capture_output=True, text=True, cwd=root)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert set(res["elbo"]) == {"continuous", "T=100"}, res["elbo"].keys()
  assert (res["info"]["num_timesteps"], res["info"]["decoder"], res["info"]["schedule"]) == (
      100, config.model.decoder, config.model.schedule)
  assert res["dtype_comparison"]["num_timesteps"] == 100
  assert "the importance and ODE sections treat the network as a continuous-time" in r.stderr


@pytest.mark.slow
def test_experiment_script_runs_on_the_toy_distribution(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "likelihood.json"
  subprocess.run([sys.executable, os.path.join(root, "experiments", "likelihood.py"), "--toy",
                  f"--output={out}", "--num_images=256", "--batch_size=128", "--timesteps=0,100",
                  "--num_time_samples=2", "--variance_repeats=50", "--is_bins=32",
                  "--ode_num_images=64", "--ode_batch_size=64", "--dequantization=vdm",
                  "--rtol=1e-6", "--atol=1e-6"], check=True, cwd=root)
  res = json.loads(out.read_text())
  entropy = res["info"]["entropy_bpd"]
  assert set(res["elbo"]) == {"continuous", "T=100", "continuous_importance"}
  for stats in list(res["elbo"].values()) + [res["ode"]["vdm"]]:
    assert abs(stats["bpd"] - entropy) < 5 * stats["bpd_se"] + 0.05
  assert res["importance"]["variance"]["ratios"]["uniform/importance+antithetic"] > 1.5


def test_paired_difference_shares_the_draws_and_detects_a_worse_denoiser():
  x = np.asarray(DATA.sample(jax.random.PRNGKey(5), 512))
  batches = [x[:256], x[256:]]
  optimal = DATA.eps_fn()
  same = likelihood.paired_difference(optimal, optimal, GAMMA, batches, jax.random.PRNGKey(6),
                                      vocab_size=4, num_samples=2)
  assert same["num_images"] == 512 and same["a_bpd"] == same["b_bpd"]
  assert same["difference_bpd"] == 0.0 and same["max_abs_difference_bpd"] == 0.0
  # Any change to the Bayes-optimal ε̂ raises E||ε − ε̂||², so the bound: the paired estimate
  # resolves a difference that is small against either bound's own SE.
  worse = lambda z, g: 1.1 * optimal(z, g)
  res = likelihood.paired_difference(optimal, worse, GAMMA, batches, jax.random.PRNGKey(6),
                                     vocab_size=4, num_samples=2)
  print(f"difference {res['difference_bpd']:.5f} ± {res['difference_se']:.5f} bits/dim; "
        f"bound {res['a_bpd']:.4f} ± {res['a_se']:.4f}")
  np.testing.assert_allclose(res["a_bpd"], same["a_bpd"], rtol=1e-6)
  assert res["difference_bpd"] > 5 * res["difference_se"]
  assert res["difference_se"] < res["a_se"] / 3
  with pytest.raises(ValueError, match="no data"):
    likelihood.paired_difference(optimal, worse, GAMMA, [], jax.random.PRNGKey(6), vocab_size=4)


def test_difference_by_time_locates_and_sums_to_the_bound_difference():
  """ε̂ = a·ε̂* for the Bayes-optimal ε̂* = E[ε|z_t]: E[ε·ε̂*] = E‖ε̂*‖², so the loss difference at
  every t is ½ γ' (a − 1)² E‖ε̂*‖² ≥ 0, the same for a = 1.1 and a = 0.9 (closed form), although
  the per-draw differences differ (the cross term flips sign)."""
  x = np.asarray(DATA.sample(jax.random.PRNGKey(5), 512))
  batches = [x[:256], x[256:]]
  optimal = DATA.eps_fn()
  key = jax.random.PRNGKey(7)
  same = likelihood.difference_by_time(optimal, optimal, GAMMA, batches, key, vocab_size=4,
                                       num_bins=8)
  assert same["num_images"] == 512 and len(same["t_edges"]) == 9
  assert same["bin_difference_bpd"] == [0.0] * 8 and same["difference_bpd"] == 0.0
  up, down = (likelihood.difference_by_time(optimal, lambda z, g, a=a: a * optimal(z, g), GAMMA,
                                            batches, key, vocab_size=4, num_bins=8)
              for a in (1.1, 0.9))
  for res in (up, down):
    assert res["difference_bpd"] > 5 * res["difference_se"]
    assert all(m > -3 * se for m, se in zip(res["bin_difference_bpd"], res["bin_difference_se"]))
  assert up["bin_difference_bpd"] != down["bin_difference_bpd"]
  gap = abs(up["difference_bpd"] - down["difference_bpd"])
  assert gap < 3 * math.hypot(up["difference_se"], down["difference_se"]), (up, down)
  # The bins' mean is the bound's difference: the paired estimate of the same pair agrees.
  paired = likelihood.paired_difference(optimal, lambda z, g: 1.1 * optimal(z, g), GAMMA, batches,
                                        jax.random.PRNGKey(6), vocab_size=4, num_samples=2)
  assert abs(paired["difference_bpd"] - up["difference_bpd"]) < 3 * math.hypot(
      paired["difference_se"], up["difference_se"])


def test_dtype_comparison_is_saved_before_its_diagnostic_by_time(monkeypatch):
  """experiments/common.compare_dtype hands its paired difference to ``save`` before it computes
  "by_time" (10 bins × 2 nets per image): a time limit that struck there lost the figure."""
  import os, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from vdm import model as model_lib  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.data.update(image_size=4, channels=1)
  config.model.update(n_layer=1, dtype="bfloat16")
  model = model_lib.make_model(config)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  images = np.random.default_rng(0).integers(0, 256, (4, 4, 4, 1))

  def time_limit(*args, **kwargs):
    raise KeyboardInterrupt  # as the signal of a command's time limit would, here
  monkeypatch.setattr(likelihood, "difference_by_time", time_limit)
  saved = []
  with pytest.raises(KeyboardInterrupt):
    common.compare_dtype(model, params, "float32", images, jax.random.PRNGKey(1), batch_size=4,
                         num_samples=1, vocab_size=256, decoder="vdm", num_timesteps=0,
                         save=saved.append)
  assert len(saved) == 1 and "by_time" not in saved[0], saved
  assert saved[0]["num_images"] == 4 and np.isfinite(saved[0]["difference_bpd"]), saved[0]


def test_time_proposal_density_divides_the_diffusion_term():
  """A "proposal" t = u with q(t) = 2 draws the continuous setting's times and noise (same keys)
  and halves its diffusion term exactly, leaving the prior and reconstruction terms: the setting
  evaluates ½ γ' ||ε − ε̂||² / q(t)."""
  x = np.asarray(DATA.sample(jax.random.PRNGKey(8), 64))
  res = likelihood.evaluate_elbo(DATA.eps_fn(), GAMMA, [x[:32], x[32:]], jax.random.PRNGKey(9),
                                 vocab_size=4, num_samples=2,
                                 time_proposals={"half": lambda u: (u, jnp.full_like(u, 2.0))})
  base, half = res["continuous"], res["continuous_half"]
  np.testing.assert_allclose(half["diffusion_bpd"], 0.5 * base["diffusion_bpd"], rtol=1e-6)
  np.testing.assert_allclose(half["diffusion_se"], 0.5 * base["diffusion_se"], rtol=1e-5)
  for term in ("prior", "reconstruction"):
    np.testing.assert_allclose(half[f"{term}_bpd"], base[f"{term}_bpd"], rtol=1e-6)


def test_difference_by_time_equals_closed_form_per_bin_and_its_se():
  """ε̂_a = 0, ε̂_b = c (every dimension), γ(t) = γ_min + Δ t²: ℓ_b − ℓ_a = γ'(t) (½ D c² − c S),
  S = Σ_d ε_d ~ N(0, D), γ'(t) = 2Δ t. Bin k (centre m_k, width w) has mean Δ m_k D c²; the
  per-image mean over the bins X = (1/K) Σ_k X_k has Var X = (1/K²) Σ_k Var X_k, Var X_k =
  E[γ'²] ((½ D c²)² + c² D) − (E γ')² (½ D c²)², E γ' = 2Δ m_k, E γ'² = 4Δ² (m_k² + w²/12)."""
  delta, c, bins = 18.3, 3.0, 8
  gamma_fn = lambda t: -13.3 + delta * jnp.asarray(t, jnp.float32) ** 2
  x = np.asarray(DATA.sample(jax.random.PRNGKey(10), 1024))
  dims, scale = DATA.dims, DATA.dims * math.log(2)
  res = likelihood.difference_by_time(lambda z, g: jnp.zeros_like(z), lambda z, g: jnp.full_like(z, c),
                                      gamma_fn, [x[i:i + 256] for i in range(0, 1024, 256)],
                                      jax.random.PRNGKey(11), vocab_size=4, num_bins=bins)
  w = 1 / bins
  m = (np.arange(bins) + 0.5) * w
  half = 0.5 * dims * c**2
  mean_k = 2 * delta * m * half / scale
  var_k = (4 * delta**2 * (m**2 + w**2 / 12) * (half**2 + c**2 * dims) - (2 * delta * m * half) ** 2)
  got, se = np.array(res["bin_difference_bpd"]), np.array(res["bin_difference_se"])
  assert np.all(np.abs(got - mean_k) < 4 * se), (got, mean_k, se)
  np.testing.assert_allclose(se, np.sqrt(var_k / 1024) / scale, rtol=0.15)
  want_se = math.sqrt(var_k.sum() / bins**2 / 1024) / scale
  assert abs(res["difference_bpd"] - mean_k.mean()) < 4 * want_se
  np.testing.assert_allclose(res["difference_se"], want_se, rtol=0.15)


def test_paired_difference_reports_the_bounds_of_evaluate_elbo():
  """a_bpd, a_se (and b's) are evaluate_elbo's bpd and bpd_se of each denoiser, same keys."""
  x = np.asarray(DATA.sample(jax.random.PRNGKey(12), 128))
  batches, rng = [x[:64], x[64:]], jax.random.PRNGKey(13)
  worse = lambda z, g: 1.2 * DATA.eps_fn()(z, g)
  res = likelihood.paired_difference(DATA.eps_fn(), worse, GAMMA, batches, rng, vocab_size=4,
                                     num_samples=2)
  for key, eps_fn in (("a", DATA.eps_fn()), ("b", worse)):
    want = likelihood.evaluate_elbo(eps_fn, GAMMA, batches, rng, vocab_size=4, num_samples=2)
    np.testing.assert_allclose(res[f"{key}_bpd"], want["continuous"]["bpd"], rtol=1e-6)
    np.testing.assert_allclose(res[f"{key}_se"], want["continuous"]["bpd_se"], rtol=1e-5)
  np.testing.assert_allclose(res["difference_bpd"], res["b_bpd"] - res["a_bpd"], rtol=1e-5)


def test_random_discrete_probs_follow_their_dirichlet_concentration():
  """FactorizedDiscrete.random draws each dimension's probabilities from Dirichlet(c, ..., c):
  every entry has mean 1/V and variance (1/V)(1 − 1/V)/(V c + 1)."""
  vocab = 4
  for c in (0.2, 5.0):
    p = toy.FactorizedDiscrete.random(0, dims=8000, vocab_size=vocab, concentration=c).probs
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p.mean(), 1 / vocab, rtol=1e-9)
    np.testing.assert_allclose(p.var(), (1 / vocab) * (1 - 1 / vocab) / (vocab * c + 1), rtol=0.05)


def test_gaussian_toy_samples_density_and_flow_are_the_closed_forms():
  """toy.Gaussian: samples y ~ N(μ, R diag(s²) Rᵀ); log_prob is log N(z; α μ, α² Σ + σ² I) at any
  γ (scipy, float64); flow maps N(α_f μ, C_f) onto N(α_t μ, C_t) with the symmetric linear map
  C_t^½ C_f^-½ (C_f and C_t commute), the probability-flow ODE's."""
  from scipy.special import expit
  from scipy.stats import multivariate_normal
  gauss = toy.Gaussian.random(0, dims=3)
  cov = gauss.rotation @ np.diag(gauss.scales**2) @ gauss.rotation.T
  y = np.asarray(gauss.sample(jax.random.PRNGKey(0), 200_000), np.float64)
  np.testing.assert_allclose(y.mean(0), gauss.mean, atol=4e-3)
  np.testing.assert_allclose(np.cov(y.T), cov, atol=3e-3)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 3)), np.float64)
  c_of = lambda g: float(expit(-g)) * cov + float(expit(g)) * np.eye(3)  # α² = σ(−γ), σ² = σ(γ)
  for g in (-3.0, 0.0, 2.0):
    want = multivariate_normal(math.sqrt(expit(-g)) * gauss.mean, c_of(g)).logpdf(z)
    np.testing.assert_allclose(np.asarray(gauss.log_prob(jnp.asarray(z, jnp.float32), g)), want,
                               rtol=1e-5)
  g_from, g_to = -5.0, 1.5
  a_from, a_to = math.sqrt(expit(-g_from)), math.sqrt(expit(-g_to))
  start = a_from * gauss.mean[None]
  np.testing.assert_allclose(gauss.flow(jnp.asarray(start, jnp.float32), g_from, g_to)[0],
                             a_to * gauss.mean, atol=1e-6)
  jac = np.asarray(gauss.flow(jnp.asarray(start + np.eye(3), jnp.float32), g_from, g_to), np.float64)
  jac = (jac - a_to * gauss.mean).T  # column j: the image of the unit step e_j
  np.testing.assert_allclose(jac, jac.T, atol=1e-5)
  np.testing.assert_allclose(jac @ c_of(g_from) @ jac.T, c_of(g_to), rtol=1e-4, atol=1e-6)


def test_experiment_images_are_the_first_of_the_split_in_consecutive_batches():
  """experiments/common: load_images takes the first ``num`` images of the split (all of them
  for num <= 0, at most the split), image_batches cuts them in order, the last batch shorter."""
  import os, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from vdm import input_pipeline  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.data.update(image_size=4, synthetic_num_test=10)
  split = config.data.eval_split
  everything = input_pipeline.load_split(config.data, split, seed=config.seed).get(np.arange(10))
  for num, want in ((0, 10), (-1, 10), (3, 3), (10, 10), (50, 10)):
    np.testing.assert_array_equal(common.load_images(config, split, num), everything[:want])
  batches = common.image_batches(everything, 4)
  assert [len(b) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(batches), everything)
  assert [len(b) for b in common.image_batches(everything[:8], 4)] == [4, 4]
