"""The shared base configuration: every other config starts from `get_config()` here and overrides.

Any field can be overridden on the command line, e.g.
``python -m vdm.main --config=configs/cifar10.py --config.training.batch_size=64``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: integers in [0, vocab_size), NHWC images.
  c.data = d = ml_collections.ConfigDict()
  d.source = "tfds"            # 'tfds' | 'npz' | 'synthetic'
  d.name = "cifar10"           # tfds dataset name (source='tfds')
  d.data_dir = ""              # tfds data_dir ('' = the tfds default)
  d.download = False           # let tfds download and prepare (array_record) a missing data set
  d.path = ""                  # npz file with train_images / test_images (source='npz')
  d.train_split = "train"
  d.eval_split = "test"
  d.image_size = 32
  d.channels = 3
  d.vocab_size = 256
  d.random_flip = False        # horizontal flips, a function of (seed, step)
  d.synthetic_num_train = 4096  # source='synthetic' only
  d.synthetic_num_test = 512
  d.prefetch = 2               # batches staged on the devices ahead of the step

  # Model: the ScoreUNet ε̂(z_t; γ_t) and the noise schedule γ(t).
  c.model = m = ml_collections.ConfigDict()
  m.n_embd = 128
  m.n_layer = 32
  m.dropout = 0.1
  m.fourier_features = True
  m.attention = False
  m.channel_mult = (1,)        # (1,) = the paper's no-down-sampling U-Net
  m.dtype = "float32"          # 'float32' | 'bfloat16' (compute dtype; parameters stay fp32)
  m.residual_dtype = "float32"  # the residual stream between blocks and the skips (vdm.nets)
  # Blocks per iteration of the loops over identical blocks (0 = all): 4 trained 5.6 % faster
  # than 1 on the H100 at batch 128, compiled in 31 s (experiments/RESULTS.md).
  m.unroll = 4
  # What ResNet blocks recompute in the backward pass (vdm.nets.REMAT): 'convs' keeps only the
  # convolutions' outputs. On the H100 it is the fastest with the blocks in a scan (unroll >= 1)
  # at batch 128, and without it the fp32 step of the CIFAR-10 model runs out of the 80 GB;
  # unrolled (unroll = 0) without remat trained faster still, in bf16 (experiments/RESULTS.md).
  m.remat = "convs"            # 'none' | 'convs' | 'full'
  # How GroupNorm + swish is computed (vdm.nets.NORM_IMPL): 'autodiff', 'recompute' (keeps only
  # the norms' inputs and group statistics; for remat='none'), 'pallas' (fused Triton kernels,
  # forward and backward) or 'pallas_conv' (a block's norms applied inside the Triton 3×3
  # convolutions that read them; XLA's backward). None of the last three is timed on a GPU yet.
  m.norm_impl = "autodiff"
  # Evaluating in bf16, the least noisy share of each batch runs in fp32 (vdm.model.eps_fn_for):
  # on the H100 this took the bf16 − fp32 bound gap from 0.0095 to 0.0003 bits/dim.
  m.eval_fp32_fraction = 0.3
  m.schedule = "learned_linear"  # 'fixed_linear' | 'learned_linear' | 'learned_monotone' | 'ddpm_linear' | 'ddpm_cosine'
  # γ's endpoints for fixed_linear, the initial ones of the learned schedules, and the range the
  # network's γ input is scaled to [0, 1] by; ddpm_* have their own γ (−9.2..10.1 linear,
  # −10.1..19.8 cosine), which these do not change.
  m.gamma_min = -13.3
  m.gamma_max = 5.0
  m.num_timesteps = 0          # 0 = continuous time
  m.antithetic_time_sampling = True
  m.decoder = "vdm"            # 'vdm' | 'discretized_gaussian'
  m.variance_minimizing = False  # fit γ's shape to the loss variance (needs 'learned_monotone', T=0)

  c.loss = ml_collections.ConfigDict()
  c.loss.weighting = "elbo"    # 'elbo' | 'simple'
  c.loss.time_sampling = "uniform"  # 'uniform' | 'importance' (t ~ q ∝ sqrt(E[ℓ(t)²]); T=0, 'elbo')
  c.loss.importance_num_bins = 64   # bins of the per-t second-moment EMA behind q
  c.loss.importance_decay = 0.99    # its EMA decay per step
  c.loss.importance_warmup_steps = 1000  # uniform t before this step
  c.loss.importance_uniform_mix = 0.1    # q(t) >= this: bounds the weights 1/q

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 2e-4
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.warmup_steps = 100
  o.ema_rate = 0.9999
  o.grad_clip = 0.0            # max global gradient norm; 0 = off

  c.training = t = ml_collections.ConfigDict()
  t.batch_size = 128           # global, over all devices and hosts
  t.num_steps = 10_000_000
  t.log_every = 100
  t.eval_every = 10_000
  t.sample_every = 50_000
  t.checkpoint_every = 10_000
  t.max_to_keep = 3
  t.max_nonfinite_steps = 10   # stop after this many non-finite steps in a row

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 128
  e.num_batches = 0            # per periodic eval during training; 0 = the whole split
  e.seed = 1

  c.sampling = s = ml_collections.ConfigDict()
  s.sampler = "ancestral"      # 'ancestral' | 'ddim' | 'euler_maruyama' | 'probability_flow'
  s.num_steps = 1000
  s.num_samples = 64
  return c
