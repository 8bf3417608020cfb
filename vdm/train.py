"""Training state, optimiser, and the jitted data-parallel train / eval / sample steps.

Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over all devices with axis 'data'; batches
are sharded along it (``P('data')``), the state is replicated, and XLA inserts the gradient
all-reduce. The randomness of step k is ``fold_in(state.rng, k)``: a function of the step, so a
resumed run continues exactly.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdm import elbo, importance, input_pipeline, logging_utils, samplers, schedules, variance
from vdm.elbo import TimeProposal
from vdm.model import Model, Params, eps_fn_for, gamma_fn_for, init_params

TIME_SAMPLINGS = ("uniform", "importance")


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []: the number of steps taken (= the data position)
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array           # uint32 [2]: the run's base key; step k uses fold_in(rng, k)
  nonfinite: jax.Array     # int32 []: consecutive steps skipped: loss, ℓ² or gradient not finite
  time_second_moment: jax.Array  # float32 [loss.importance_num_bins]: EMA of ℓ(t)² per bin of t


# ---------------------------------------------------------------- sharding -----------------------

def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D 'data' mesh over ``devices`` (default: all devices)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------- optimiser ----------------------

def learning_rate_fn(opt_config) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then constant."""
  if opt_config.warmup_steps <= 0:
    return optax.constant_schedule(opt_config.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt_config.learning_rate, opt_config.warmup_steps),
       optax.constant_schedule(opt_config.learning_rate)], [opt_config.warmup_steps])


def check_optimizer_config(opt_config) -> None:
  """Raise ValueError, naming the key and its range, for optimizer settings that would otherwise
  run silently (a negative learning rate ascends the loss; b2 = 1 never forgets a gradient;
  ema_rate = 1 freezes the EMA parameters)."""
  o = opt_config
  if not 0 < o.learning_rate < math.inf:
    raise ValueError(f"optimizer.learning_rate={o.learning_rate} must be finite and > 0 (2e-4 in "
                     "the paper).")
  for key in ("b1", "b2", "ema_rate"):
    if not 0.0 <= o[key] < 1.0:
      raise ValueError(f"optimizer.{key}={o[key]} must be in [0, 1) (an exponential decay rate).")
  if not 0 < o.eps < math.inf:
    raise ValueError(f"optimizer.eps={o.eps} must be finite and > 0 (it keeps Adam's division "
                     "finite).")
  for key, meaning in (("weight_decay", "0 = none"), ("warmup_steps", "0 = none"),
                       ("grad_clip", "0 = no clipping")):
    if not 0 <= o[key] < math.inf:  # also refuses nan
      raise ValueError(f"optimizer.{key}={o[key]} must be finite and >= 0 ({meaning}).")


def applied_updates(opt_state) -> jax.Array:
  """The updates the optimizer has applied, the step its learning-rate schedule reads: behind
  ``state.step`` by the non-finite steps skipped (they keep the optimizer state)."""
  return optax.tree_utils.tree_get(
      opt_state, "count",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")


def decay_mask(params: Params) -> Params:
  """True for the weights AdamW decays: the network's, except its biases (as the published VDM
  code: kernels and norm scales are decayed); never the noise schedule's (that code decays its
  endpoints towards γ = 0)."""
  def decayed(group, path):
    return group == "net" and getattr(path[-1], "key", None) != "bias"
  return {k: jax.tree_util.tree_map_with_path(lambda path, _, k=k: decayed(k, path), v)
          for k, v in params.items()}


def make_optimizer(opt_config) -> optax.GradientTransformation:
  """AdamW with warm-up, decaying the weights of :func:`decay_mask`.

  Its state does not depend on ``learning_rate`` or ``grad_clip`` (clipping is :func:`clip`,
  outside it), so a diverged run can resume from its last checkpoint with either changed.
  """
  return optax.adamw(learning_rate_fn(opt_config), b1=opt_config.b1, b2=opt_config.b2,
                     eps=opt_config.eps, weight_decay=opt_config.weight_decay, mask=decay_mask)


def clip(grads, max_norm: float):
  """g · min(1, max_norm / ‖g‖) for max_norm > 0 (optax's global-norm clipping, stateless); g
  for max_norm = 0."""
  if max_norm <= 0:
    return grads
  clipper = optax.clip_by_global_norm(max_norm)
  return clipper.update(grads, clipper.init(grads))[0]


def create_train_state(config, model: Model, mesh: Mesh | None = None) -> TrainState:
  """Step 0: fresh parameters (EMA = parameters), optimiser state and the run's key from the seed."""
  rng = jax.random.PRNGKey(config.seed)
  params = init_params(model, jax.random.fold_in(rng, 0x1417))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema_params=jax.tree.map(jnp.copy, params),
                     opt_state=make_optimizer(config.optimizer).init(params), rng=rng,
                     nonfinite=jnp.zeros((), jnp.int32),
                     time_second_moment=jnp.zeros((config.loss.importance_num_bins,), jnp.float32))
  return jax.device_put(state, replicated(mesh)) if mesh is not None else state


def abstract_train_state(config, model: Model) -> TrainState:
  """The shapes and dtypes of the state, without computing it (for restoring checkpoints)."""
  return jax.eval_shape(lambda: create_train_state(config, model))


# ---------------------------------------------------------------- steps --------------------------

def _elbo_kwargs(config) -> dict:
  m = config.model
  return dict(vocab_size=config.data.vocab_size, num_timesteps=m.num_timesteps,
              antithetic=m.antithetic_time_sampling, decoder=m.decoder)



def check_loss_config(config) -> None:
  """Raise ValueError unless the loss options combine: the variance-minimising schedule and
  importance-sampled t are for the continuous-time ELBO (the former also needs γ's endpoints)."""
  m, loss = config.model, config.loss
  if loss.time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"unknown loss.time_sampling {loss.time_sampling!r}: use one of "
                     f"{', '.join(TIME_SAMPLINGS)}.")
  continuous_elbo = m.num_timesteps == 0 and loss.weighting == "elbo"
  if m.variance_minimizing and not (continuous_elbo and m.schedule == "learned_monotone"):
    raise ValueError("model.variance_minimizing=True needs model.num_timesteps=0, "
                     "loss.weighting='elbo' and model.schedule='learned_monotone': set them or "
                     "set model.variance_minimizing=False.")
  if m.variance_minimizing and config.optimizer.grad_clip > 0:
    raise ValueError("optimizer.grad_clip clips one global norm, which the schedule's variance "
                     "gradients (another loss, another scale) would dominate with "
                     "model.variance_minimizing=True: set optimizer.grad_clip=0.")
  if loss.weighting == "simple" and m.schedule in ("learned_linear", "learned_monotone"):
    raise ValueError(f"loss.weighting='simple' with model.schedule={m.schedule!r} trains the "
                     "schedule on the ε-MSE, which only falls as γ rises (more noise makes ε "
                     "easier to predict) and which lacks the prior and reconstruction terms that "
                     "hold γ(0), γ(1) in place: use a fixed schedule (model.schedule=fixed_linear, "
                     "ddpm_linear or ddpm_cosine) or loss.weighting='elbo'.")
  if loss.time_sampling == "importance" and not continuous_elbo:
    raise ValueError("loss.time_sampling='importance' needs model.num_timesteps=0 and "
                     "loss.weighting='elbo': set them or use loss.time_sampling='uniform'.")
  if loss.importance_num_bins < 1 or loss.importance_warmup_steps < 0:
    raise ValueError(f"loss.importance_num_bins={loss.importance_num_bins} must be >= 1 and "
                     f"loss.importance_warmup_steps={loss.importance_warmup_steps} >= 0.")
  if not 0.0 <= loss.importance_decay < 1.0:
    raise ValueError(f"loss.importance_decay={loss.importance_decay} must be in [0, 1).")
  if not 0.0 < loss.importance_uniform_mix <= 1.0:
    raise ValueError(f"loss.importance_uniform_mix={loss.importance_uniform_mix} must be in (0, 1]: "
                     "it floors q(t), bounding the importance weights 1/q(t).")


def time_proposal_params(loss_config, state: TrainState) -> importance.ProposalParams:
  """The training proposal q(t) ∝ sqrt(state.time_second_moment), each bin raised to the largest
  of its own and its neighbours' and floored by ``importance_uniform_mix``
  (:func:`vdm.importance.proposal_from_second_moment`, ``spread=1``); uniform before step
  ``importance_warmup_steps``."""
  probs = importance.proposal_from_second_moment(state.time_second_moment,
                                                 loss_config.importance_uniform_mix)["probs"]
  warm = state.step >= loss_config.importance_warmup_steps
  return {"probs": jnp.where(warm, probs, 1.0 / probs.shape[0])}


def loss_and_grads(config, model: Model, params, batch: jax.Array, rng_elbo: jax.Array,
                   rng_dropout: jax.Array, time_proposal: TimeProposal | None = None
                   ) -> tuple[jax.Array, dict, Any]:
  """(training loss, ``elbo_terms``' terms, gradients w.r.t. ``params``) of one batch.

  With ``model.variance_minimizing`` the schedule's shape gradients are those of the second
  moment of the diffusion loss (:func:`vdm.variance.elbo_and_grads`); all others are the ELBO's.
  """
  kwargs = _elbo_kwargs(config)
  if config.model.variance_minimizing:
    res = variance.elbo_and_grads(
        lambda net: eps_fn_for(model, {"net": net}, train=True, rng=rng_dropout), params["net"],
        lambda sp: schedules.bind(model.schedule, sp), params["schedule"], batch, rng_elbo,
        vocab_size=kwargs["vocab_size"], antithetic=kwargs["antithetic"],
        decoder=kwargs["decoder"], time_proposal=time_proposal)
    return res.loss, res.terms, {"net": res.score_grads, "schedule": res.gamma_grads}

  def loss_fn(params):
    terms = elbo.elbo_terms(eps_fn_for(model, params, train=True, rng=rng_dropout),
                            gamma_fn_for(model, params), batch, rng_elbo,
                            time_proposal=time_proposal, **kwargs)
    return elbo.training_loss(terms, batch, config.loss.weighting,
                              config.model.num_timesteps), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, terms, grads


def make_train_step(config, model: Model, mesh: Mesh) -> jax.stages.Wrapped:
  """The jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

  The gradients are those of the training loss, or with ``model.variance_minimizing`` those of
  :func:`vdm.variance.elbo_and_grads` (the schedule's shape follows the loss variance). With
  ``loss.time_sampling='importance'`` t ~ q(t) of :func:`time_proposal_params` and the diffusion
  term is divided by q(t), an unbiased ELBO estimate. Every step updates the EMA of ℓ(t)², ℓ the
  unweighted diffusion loss, in ``state.time_second_moment``.

  A step whose loss, gradient norm, new parameters or ℓ² EMA is not finite leaves params, EMA,
  optimiser state and ℓ² EMA unchanged and increments ``state.nonfinite`` (reset to 0 by the next
  good step).
  """
  check_loss_config(config)
  tx = make_optimizer(config.optimizer)
  lr_fn = learning_rate_fn(config.optimizer)
  ema_rate = config.optimizer.ema_rate
  loss_cfg = config.loss

  def train_step(state: TrainState, batch: jax.Array):
    rng = jax.random.fold_in(state.rng, state.step)
    rng_elbo, rng_dropout = jax.random.split(rng)
    dims = elbo.data_dims(batch)
    proposal, density = None, jnp.ones_like
    if loss_cfg.time_sampling == "importance":
      q_params = time_proposal_params(loss_cfg, state)
      proposal, density = importance.time_proposal(q_params), partial(importance.density, q_params)
    loss, terms, grads = loss_and_grads(config, model, state.params, batch, rng_elbo, rng_dropout,
                                        proposal)
    # ℓ(t) = q(t) × the 1/q-weighted diffusion term.
    second_moment = importance.update_second_moment(
        state.time_second_moment, terms["t"], terms["diffusion"] * density(terms["t"]),
        loss_cfg.importance_decay)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(clip(grads, config.optimizer.grad_clip),
                                   state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A spike's ℓ² can overflow where ℓ did not; kept, that inf would make every later q(t) nan.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(params)) & jnp.all(jnp.isfinite(second_moment)))
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
        time_second_moment=keep(second_moment, state.time_second_moment))

    gamma_0, gamma_1 = gamma_fn_for(model, state.params)(jnp.array([0.0, 1.0]))
    metrics = {
        "loss": loss,
        "bpd": elbo.nats_to_bpd(jnp.mean(elbo.total_nats(terms)), dims),
        **{f"{k}_bpd": elbo.nats_to_bpd(jnp.mean(terms[k]), dims) for k in elbo.TERMS},
        "diffusion_second_moment": jnp.mean(elbo.nats_to_bpd(terms["diffusion"], dims) ** 2),
        "sigma2_0": schedules.sigma2(gamma_0),
        "sigma2_1": schedules.sigma2(gamma_1),
        "gamma_0": gamma_0,
        "gamma_1": gamma_1,
        "lr": lr_fn(applied_updates(state.opt_state)),
        "grad_norm": grad_norm,
        "nonfinite": new_state.nonfinite,
    }
    return new_state, metrics

  state_sharding = replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, state_sharding), donate_argnums=(0,))


def make_eval_step(config, model: Model, mesh: Mesh) -> jax.stages.Wrapped:
  """The jitted ``eval_step(params, batch, mask, rng) -> sums``: masked sums over the batch of the
  bound and each term in bits/dim, of its square, and the count (deterministic net, no dropout).
  The antithetic times are spread over the rows ``mask`` keeps, so a padded batch's images get the
  times of an unpadded batch of their number."""
  kwargs = _elbo_kwargs(config)

  def eval_step(params, batch, mask, rng):
    dims = elbo.data_dims(batch)
    terms = elbo.elbo_terms(eps_fn_for(model, params, bound=True), gamma_fn_for(model, params),
                            batch, rng, mask=mask, **kwargs)
    per_example = {k: elbo.nats_to_bpd(terms[k], dims) for k in elbo.TERMS}
    per_example["bpd"] = elbo.nats_to_bpd(elbo.total_nats(terms), dims)
    sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
    sums["bpd_sq"] = jnp.sum(per_example["bpd"] ** 2 * mask)
    sums["count"] = jnp.sum(mask)
    return sums

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(rep, data, data, rep), out_shardings=rep)


def summarize_eval(totals: dict) -> dict:
  """Means of the accumulated sums, with the standard error of the mean bound (nan for one
  image, whose spread is unknown)."""
  n = max(float(totals["count"]), 1.0)
  out = {k: float(totals[k]) / n for k in ("bpd",) + elbo.TERMS}
  var = max(float(totals["bpd_sq"]) / n - out["bpd"] ** 2, 0.0)
  out["bpd_stderr"] = math.sqrt(var / (n - 1.0)) if n >= 2 else math.nan  # one image: unknown
  out["num_examples"] = int(n)
  return out


def evaluate(eval_step, params, split, config, mesh, num_batches: int = 0, desc: str = "eval") -> dict:
  """The bound on ``split`` (its first ``num_batches`` batches; 0 = all) with ``params``."""
  if num_batches < 0:
    raise ValueError(f"num_batches={num_batches} must be >= 0 (0 = the whole split).")
  total = input_pipeline.num_eval_batches(split, config.eval.batch_size)
  if num_batches:
    total = min(total, num_batches)
  batches = input_pipeline.eval_batches(split, config.eval.batch_size)
  staged = input_pipeline.prefetch((b for i, b in zip(range(total), batches)),
                                   batch_sharding(mesh), config.data.prefetch)
  rng = jax.random.PRNGKey(config.eval.seed)
  sums = None
  for i, (x, mask) in enumerate(logging_utils.progress(staged, total, desc)):
    out = eval_step(params, x, mask, jax.random.fold_in(rng, i))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  return summarize_eval(jax.device_get(sums))


def check_sampling_steps(num_timesteps: int, num_steps: int, what: str = "num_steps") -> None:
  """A T-step model (T = ``num_timesteps`` > 0) is trained at t = i/T alone; a sampler's times
  j/N, j ≥ 1, are all among them when N divides T. Raise ValueError otherwise. (The last Heun
  stage of ``probability_flow`` also asks ε̂ at t = 0, where L_0 trains it only with the
  "discretized_gaussian" decoder.)"""
  if num_timesteps > 0 and num_timesteps % num_steps:
    divisor = max(d for d in range(1, min(num_steps, num_timesteps) + 1) if num_timesteps % d == 0)
    raise ValueError(f"{what}={num_steps} does not divide model.num_timesteps={num_timesteps}, so "
                     "the sampler would ask the network about times it was not trained at: use a "
                     f"divisor of {num_timesteps} (e.g. {divisor}).")


def make_sample_fn(config, model: Model, sampler: str, num_steps: int, num_samples: int,
                   mesh: Mesh) -> Callable:
  """The jitted ``sample(params, rng) -> int32 [num_samples, H, W, C]``: z_1 ~ N(0, I), the
  reverse process with ``sampler`` in ``num_steps`` steps, then :func:`vdm.samplers.decode` with the
  model's decoder and no rng (the discretized Gaussian's is centred on x̂_0: one more denoiser
  call, at γ_0). The samples are split over ``mesh``'s devices, padded to a multiple of their
  count; the random draws are those of one device, so the images do not depend on the count."""
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(samplers.SAMPLERS)}.")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1.")
  check_sampling_steps(config.model.num_timesteps, num_steps)
  vocab, decoder = config.data.vocab_size, config.model.decoder
  padded = -(-num_samples // mesh.size) * mesh.size

  def sample(params, rng):
    eps_fn, gamma_fn = eps_fn_for(model, params), gamma_fn_for(model, params)
    rng_z, rng_s = jax.random.split(rng)
    z = jax.random.normal(rng_z, (padded,) + model.image_shape)
    z = jax.lax.with_sharding_constraint(z, batch_sharding(mesh))
    z = samplers.SAMPLERS[sampler](eps_fn, gamma_fn, z, num_steps, rng_s)
    gamma_0 = gamma_fn(jnp.zeros(()))
    x_hat = elbo.decoder_x_hat(eps_fn, z, gamma_0, decoder)
    return samplers.decode(z, gamma_0, vocab_size=vocab, decoder=decoder, x_hat=x_hat)[:num_samples]

  rep = replicated(mesh)
  return jax.jit(sample, in_shardings=(rep, rep), out_shardings=rep)
