"""Dataset-level ELBO evaluation in bits/dim, with honest standard errors.

One call evaluates the same denoiser under several settings of the bound (continuous time,
discrete time with T steps, continuous time with an importance proposal over t) on the same
images, drawing K Monte-Carlo samples (t, ε, z_0) per image for each.

``eps_fn`` and ``gamma_fn`` are any callables of the :mod:`vdm.elbo` interface. Every function
here jit-compiles with :func:`equinox.filter_jit`: arrays inside pytree arguments are traced,
everything else is static, and a compiled program is reused while the static parts are the same
objects. Pass a trained network as ``vdm.model.traced_fns(model, params)`` or
``jax.tree_util.Partial(apply, params)`` (callable pytrees), so that its parameters are traced
arguments: new parameters give new results, with no recompiling. A plain function or closure is
compiled with the values it reads on its first call, as ``jax.jit`` compiles one: called again,
the same function gives the same result even if the parameters it reads have changed since (a
notebook's training loop). That suits fixed functions, such as the toy denoisers.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from vdm import elbo, schedules
from vdm.elbo import EpsFn, TimeProposal
from vdm.importance import diffusion_loss_at, times_in_bin
from vdm.schedules import GammaFn

TERMS = elbo.TERMS + ("total",)


def setting_name(num_timesteps: int) -> str:
  """"continuous" for T = 0, else "T=<T>"."""
  return "continuous" if num_timesteps == 0 else f"T={num_timesteps}"


def mean_and_se(per_image: np.ndarray) -> tuple[float, float]:
  """(mean, standard error) of per-image values: sd(ddof=1)/sqrt(N); SE is nan for N < 2."""
  v = np.asarray(per_image, np.float64).reshape(-1)
  if v.size < 2:
    return float(v.mean()) if v.size else float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def elbo_samples(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, rng: jax.Array, *,
                 vocab_size: int = 256, num_timesteps: int = 0, num_samples: int = 1,
                 antithetic: bool = True, decoder: str = "vdm",
                 time_proposal: Optional[TimeProposal] = None,
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Per-image Monte-Carlo means over ``num_samples`` draws of the ELBO terms, in nats.

  Returns {"prior", "diffusion", "reconstruction", "total"}: each [B], the mean over the K
  draws, and "total_var": [B], the sample variance over the K draws of the one-sample total
  (nan for K = 1), i.e. the Monte-Carlo noise of a single draw. The K draws run as a
  ``lax.scan`` over keys (one batch-sized denoiser call each), so the denoiser's memory does not
  grow with K (the scan keeps only the K × 4 per-image terms);
  with ``antithetic`` each draw stratifies t across the batch (across the rows ``mask`` keeps, in
  a padded batch: :func:`vdm.elbo.sample_times`). x, K, T and γ are checked here, before
  compiling, where their values are known.
  """
  elbo.check_data(x, vocab_size)
  elbo.check_num_timesteps(num_timesteps)
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1.")
  schedules.check_increasing(gamma_fn)
  return _elbo_samples(eps_fn, gamma_fn, x, rng, vocab_size=vocab_size, num_timesteps=num_timesteps,
                       num_samples=num_samples, antithetic=antithetic, decoder=decoder,
                       time_proposal=time_proposal, mask=mask)


@eqx.filter_jit
def _elbo_samples(eps_fn, gamma_fn, x, rng, *, vocab_size, num_timesteps, num_samples, antithetic,
                  decoder, time_proposal, mask):
  def draw(_, key):
    terms = elbo.elbo_terms(eps_fn, gamma_fn, x, key, vocab_size=vocab_size,
                            num_timesteps=num_timesteps, antithetic=antithetic, decoder=decoder,
                            time_proposal=time_proposal, mask=mask)
    return None, jnp.stack([terms["prior"], terms["diffusion"], terms["reconstruction"],
                            elbo.total_nats(terms)])

  _, values = jax.lax.scan(draw, None, jax.random.split(rng, num_samples))  # [K, 4, B]
  out = dict(zip(TERMS, values.mean(axis=0)))
  # Two-pass variance (jnp.var centres first): Σv² − K·mean² cancels in fp32 when the totals
  # (thousands of nats) dwarf their spread (tens of nats).
  out["total_var"] = values[:, -1].var(axis=0, ddof=1) if num_samples > 1 else \
      jnp.full(x.shape[:1], jnp.nan, jnp.float32)
  return out


def _per_image(settings: Mapping[str, tuple[EpsFn, dict]], gamma_fn: GammaFn,
               batches: Iterable[ArrayLike], rng: jax.Array, vocab_size: int
               ) -> tuple[dict[str, dict[str, np.ndarray]], int]:
  """{setting: {output: per-image values over all batches}} of :func:`elbo_samples` with each
  setting's (eps_fn, keyword arguments), and D. Batch i uses the key fold_in(rng, i) under every
  setting (common random numbers)."""
  def one_batch(x, key, keep):
    return {name: {k: np.asarray(v)[np.asarray(keep)]
                   for k, v in elbo_samples(eps_fn, gamma_fn, x, key, mask=keep, **kwargs).items()}
            for name, (eps_fn, kwargs) in settings.items()}

  per_batch, dims = elbo.over_batches(batches, rng, vocab_size, one_batch)
  return {name: {k: np.concatenate([b[name][k] for b in per_batch]) for k in per_batch[0][name]}
          for name in settings}, dims


def evaluate_elbo(eps_fn: EpsFn, gamma_fn: GammaFn, batches: Iterable[ArrayLike], rng: jax.Array, *,
                  vocab_size: int = 256, timesteps: Sequence[int] = (0,), num_samples: int = 1,
                  antithetic: bool = True, decoder: str = "vdm",
                  time_proposals: Optional[Mapping[str, TimeProposal]] = None
                  ) -> dict[str, dict[str, float]]:
  """The ELBO in bits/dim over a dataset, for each setting, on the same images.

  Settings: one per T in ``timesteps`` (0 = continuous time, named "continuous"; T > 0 named
  "T=<T>"), plus one continuous-time setting per entry of ``time_proposals`` (name → proposal,
  e.g. {"importance": importance.time_proposal(params)}). ``batches`` yields integer arrays
  [B, ...] in [0, vocab_size); it is consumed once, each batch evaluated under every setting
  with common random numbers (the same keys).

  Returns {setting: stats} with, in bits/dim, "bpd" and "bpd_se", "<term>_bpd" and
  "<term>_se" for prior / diffusion / reconstruction, "mc_std_bpd" (the standard deviation of a
  one-draw estimate of one image's bound, averaged in variance over images; nan for K = 1),
  and "num_images", "num_samples".

  Why this SE is honest: the estimate is the average over N images of m_i, image i's mean over
  its K draws. The m_i are independent across images (distinct test images; the draws of
  different images are independent, except that antithetic times correlate them negatively
  inside a batch, which only makes the SE conservative) and identically distributed, so
  sd(m_i)/sqrt(N) estimates the sampling error of their mean, covering both the spread of the
  true per-image bound across images and the Monte-Carlo noise left in each m_i. Treating all
  N·K draws as independent would instead divide the between-image spread by N·K, understating
  the SE by up to sqrt(K) when, as usual, that spread dominates.
  """
  if not timesteps and not time_proposals:
    raise ValueError("nothing to evaluate: give at least one T in timesteps (0 = continuous) or a "
                     "time proposal.")
  for T in timesteps:
    elbo.check_num_timesteps(T)
  settings: dict[str, dict] = {setting_name(T): {"num_timesteps": T} for T in timesteps}
  for name, proposal in (time_proposals or {}).items():
    settings[f"continuous_{name}"] = {"num_timesteps": 0, "time_proposal": proposal}

  shared = dict(vocab_size=vocab_size, num_samples=num_samples, antithetic=antithetic,
                decoder=decoder)
  values, dims = _per_image(
      {name: (eps_fn, {**shared, **kwargs}) for name, kwargs in settings.items()}, gamma_fn,
      batches, rng, vocab_size)

  results = {}
  for name, vals in values.items():
    per_image = {k: elbo.nats_to_bpd(v, dims) for k, v in vals.items() if k != "total_var"}
    bpd, se = mean_and_se(per_image["total"])
    stats = {"bpd": bpd, "bpd_se": se}
    for term in TERMS[:-1]:
      stats[f"{term}_bpd"], stats[f"{term}_se"] = mean_and_se(per_image[term])
    stats["mc_std_bpd"] = float(elbo.nats_to_bpd(np.sqrt(np.mean(vals["total_var"])), dims))
    stats["num_images"] = int(per_image["total"].size)
    stats["num_samples"] = int(num_samples)
    results[name] = stats
  return results


def paired_difference(eps_fn_a: EpsFn, eps_fn_b: EpsFn, gamma_fn: GammaFn,
                      batches: Iterable[ArrayLike], rng: jax.Array, *, vocab_size: int = 256,
                      num_timesteps: int = 0, num_samples: int = 1, antithetic: bool = True,
                      decoder: str = "vdm") -> dict[str, float]:
  """The bound of two denoisers on the same images with the same draws of (t, ε, z_0), in bits/dim.

  E.g. one network at two compute precisions. Returns "a_bpd", "a_se", "b_bpd", "b_se" and the
  mean per-image difference d_i = b_i − a_i as "difference_bpd" with its SE sd(d_i)/sqrt(N),
  plus "max_abs_difference_bpd" and "num_images". Sharing the draws (common random numbers)
  cancels the Monte-Carlo and between-image noise that both bounds share, so the SE of the
  difference is far below either bound's SE.
  """
  kwargs = dict(vocab_size=vocab_size, num_timesteps=num_timesteps, num_samples=num_samples,
                antithetic=antithetic, decoder=decoder)
  values, dims = _per_image({"a": (eps_fn_a, kwargs), "b": (eps_fn_b, kwargs)}, gamma_fn, batches,
                            rng, vocab_size)
  a, b = (elbo.nats_to_bpd(values[k]["total"].astype(np.float64), dims) for k in "ab")
  out = {}
  out["a_bpd"], out["a_se"] = mean_and_se(a)
  out["b_bpd"], out["b_se"] = mean_and_se(b)
  out["difference_bpd"], out["difference_se"] = mean_and_se(b - a)
  out["max_abs_difference_bpd"] = float(np.abs(b - a).max())
  out["num_images"] = int(a.size)
  return out


@eqx.filter_jit
def _loss_differences(eps_fn_a: EpsFn, eps_fn_b: EpsFn, gamma_fn: GammaFn, x: jax.Array,
                      rng: jax.Array, keep: jax.Array, num_bins: int, vocab_size: int) -> jax.Array:
  """ℓ_b(t) − ℓ_a(t) per bin and image [num_bins, B], with the same t (uniform in the bin) and ε;
  the rows ``keep`` leaves out (padding) at the top of each bin."""
  def one_bin(carry, b):
    t, key_eps = times_in_bin(rng, b, x.shape[0], num_bins, keep)
    la, lb = (diffusion_loss_at(f, gamma_fn, x, t, key_eps, vocab_size=vocab_size)
              for f in (eps_fn_a, eps_fn_b))
    return carry, lb - la

  return jax.lax.scan(one_bin, None, jnp.arange(num_bins))[1]


def difference_by_time(eps_fn_a: EpsFn, eps_fn_b: EpsFn, gamma_fn: GammaFn,
                       batches: Iterable[ArrayLike], rng: jax.Array, *, vocab_size: int = 256,
                       num_bins: int = 10) -> dict:
  """Where in t two denoisers' bounds differ (continuous time), in bits/dim.

  For each of ``num_bins`` equal-width bins of t: the mean over images of ℓ_b(t) − ℓ_a(t),
  ℓ(t) = ½ γ'(t) ‖ε − ε̂(z_t; γ_t)‖², one t uniform in the bin and one ε per image, shared by both
  denoisers; with its SE over images. Since the diffusion loss is E_t ℓ(t), the mean over the bins
  estimates the difference of the two bounds ("difference_bpd", with its SE over images). Returns
  also "t_edges" [num_bins + 1], "bin_difference_bpd", "bin_difference_se" and "num_images".
  """
  if num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1.")
  schedules.check_increasing(gamma_fn)
  per_image, dims = elbo.over_batches(batches, rng, vocab_size, lambda x, key, keep: np.asarray(
      _loss_differences(eps_fn_a, eps_fn_b, gamma_fn, x, key, keep, num_bins, vocab_size)
  )[:, np.asarray(keep)])
  d = elbo.nats_to_bpd(np.concatenate(per_image, axis=1).astype(np.float64), dims)  # [bins, N]
  bins = [mean_and_se(row) for row in d]
  out = {"t_edges": np.linspace(0.0, 1.0, num_bins + 1).tolist(),
         "bin_difference_bpd": [m for m, _ in bins], "bin_difference_se": [se for _, se in bins]}
  out["difference_bpd"], out["difference_se"] = mean_and_se(d.mean(axis=0))
  out["num_images"] = int(d.shape[1])
  return out
