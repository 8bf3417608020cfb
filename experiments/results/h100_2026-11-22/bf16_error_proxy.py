"""cpu-2 check, 2026-11-22: rms of eps_hat(bf16) - eps_hat(fp32) for the CIFAR-10 ScoreUNet with random
weights (zero-initialised layers made non-zero), bf16 vs fp32 residual stream, at five gamma values.
Run: PYTHONPATH=. python experiments/results/h100_2026-11-22/bf16_error_proxy.py"""
import jax, jax.numpy as jnp, numpy as np, time
from vdm.nets import ScoreUNet
B=2
z = jax.random.normal(jax.random.PRNGKey(1),(B,32,32,3))
net = ScoreUNet(n_layer=32)
params = net.init(jax.random.PRNGKey(0), z, jnp.zeros(B))
# make the zero-initialised layers active, as after training
leaves, tree = jax.tree_util.tree_flatten_with_path(params)
key = jax.random.PRNGKey(2); new=[]
for path, p in leaves:
  key, k = jax.random.split(key)
  if p.ndim >= 2 and float(jnp.abs(p).max()) == 0:
    fan_in = np.prod(p.shape[:-1]) if p.ndim>1 else 1
    p = jax.random.normal(k, p.shape) * 0.5 / np.sqrt(fan_in)
  new.append(p)
params = jax.tree_util.tree_unflatten(tree, new)
x = jax.random.randint(jax.random.PRNGKey(3),(B,32,32,3),0,256)/127.5-1
for g in [-13.0, -8.0, -3.0, 0.0, 4.0]:
  a2 = jax.nn.sigmoid(-g); s2 = jax.nn.sigmoid(g)
  zt = jnp.sqrt(a2)*x + jnp.sqrt(s2)*z
  gg = jnp.full((B,), g)
  ref = ScoreUNet(n_layer=32).apply(params, zt, gg)
  out = {}
  for rd in ["bfloat16","float32"]:
    e = ScoreUNet(n_layer=32, dtype="bfloat16", residual_dtype=rd).apply(params, zt, gg)
    out[rd] = float(jnp.sqrt(jnp.mean((e-ref)**2)))
  print(f"gamma {g:6.1f}  |f| {float(jnp.sqrt(jnp.mean((ref-zt)**2))):.3f}  rms(bf16 - fp32): bf16 stream {out['bfloat16']:.5f}  fp32 stream {out['float32']:.5f}", flush=True)
