import torch, torch.nn.functional as F, jax, jax.numpy as jnp, numpy as np
from backends.torch.loss import chunked_cross_entropy as tc
from backends.flax.loss import chunked_cross_entropy as jc
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
for dt in (None, torch.bfloat16):
    torch.manual_seed(0)
    N, D, V = 3000, 256, 32000
    h = torch.randn(N, D, device=dev, requires_grad=True); w = (torch.randn(V, D, device=dev) * .05).requires_grad_()
    b = torch.randn(V, device=dev, requires_grad=True); t = torch.randint(0, V, (N,), device=dev); t[:700] = -100
    def run(fn):
        h.grad = w.grad = b.grad = None
        with torch.autocast("cuda", dtype=dt or torch.float32, enabled=dt is not None):
            l = fn(h, w, b, t)
        l.backward(); return l.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()
    ref = run(lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b).float(), t))
    for name, fn in (("eager", lambda h, w, b, t: tc(h, w, b, t, 512)),
                     ("inductor", torch.compile(lambda h, w, b, t: tc(h, w, b, t, 512), fullgraph=True))):
        got = run(fn)
        print(dt, name, [float((a - r).norm() / r.norm()) for a, r in zip(got, ref)])
jax.config.update("jax_default_matmul_precision", "highest")
hj, wj, bj = (jnp.asarray(x.detach().cpu().numpy()) for x in (h, w, b)); tj = jnp.asarray(t.cpu().numpy())
for dt in (jnp.float32, jnp.bfloat16):
    f = lambda h, w, b: jc(h.astype(dt), w, b, tj, 512, weight_layout="VD")
    p = lambda h, w, b: __import__("backends.flax.model", fromlist=["x"]).cross_entropy(h.astype(dt) @ w.astype(dt).T + b.astype(dt), tj)
    a = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hj, wj, bj); r = jax.jit(jax.value_and_grad(p, argnums=(0, 1, 2)))(hj, wj, bj)
    print(dt, float(abs(a[0] - r[0]) / r[0]), [float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y)) for x, y in zip(a[1], r[1])])
