"""CPU speed probes for issue 6 that did not make it into the library: measured, kept for the record.

    python experiments/benchmarks/cpu/probes/probes.py compile       # torch.compile of the per-task meta-gradient
    python experiments/benchmarks/cpu/probes/probes.py conv_backward # stride-2 convolution backward, NCHW vs NHWC
    python experiments/benchmarks/cpu/probes/probes.py thread_scaling # what a second core gives each strategy
    python experiments/benchmarks/cpu/probes/probes.py shared_first_step # first inner step of all tasks as one batch
    python experiments/benchmarks/cpu/probes/probes.py kernel_floor  # time in the convolution kernels alone

Each prints medians of interleaved repeats (the first round is a warm-up) and the agreement of the gradients.
Every probe goes through public API only (``MetaLearner.meta_gradient``, ``meta.models.functional_forward``, the
benchmark candidates in benchmarks/meta_step.py). Three measurements that replaced library methods at run time
were retired (their results stay in README.md; their code is in git history, commit a14f838): ``fused_norm``
(swapped ``TaskBatchNorm.forward``), ``layer1_unfold`` (reassigned a convolution's ``impl`` after construction)
and ``conv_backward``'s whole-model channels-last timing (swapped ``TaskConv2d.forward``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call, grad, vmap

import meta
from benchmarks.meta_step import Setting, learn2learn_maml, ours, random_tasks
from meta.models import relative_error
from meta.models.networks import Conv4, initialize


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 6) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}


def on_threads(threads: int, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` run with ``threads`` torch threads, then back to 2."""
    def run() -> None:
        torch.set_num_threads(threads)
        try:
            fn()
        finally:
            torch.set_num_threads(2)
    return run


def setup(ways: int, shots: int, tasks: int, steps: int, first_order: bool = False):
    s = Setting(ways, shots, shots, tasks, steps, first_order)
    batch = random_tasks(s, torch.device("cpu"), torch.Generator().manual_seed(0))
    model = initialize(Conv4(ways), torch.Generator().manual_seed(1))
    rule = meta.first_order(meta.sgd(lr=s.lr)) if first_order else meta.sgd(lr=s.lr)
    learner = meta.MetaLearner(model, rule, inner_steps=steps)
    return s, batch, model, learner


# ---- torch.compile --------------------------------------------------------------------------------
def probe_compile() -> None:
    """The functorch-style per-task meta-gradient compiled whole (inner grad and outer grad traced by dynamo),
    on one thread per task and under vmap, against this library's loop_threads step (5w5s, 32 tasks, 1 step,
    second order)."""
    s, batch, model, _ = setup(5, 5, 32, 1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_for_task(p, sx, sy, qx, qy):
        def loss(q, x, y):
            return F.cross_entropy(functional_call(model, q, (x,)), y)

        new = p
        for _ in range(s.steps):
            g = grad(loss)(new, sx, sy)
            new = {k: new[k] - s.lr * g[k] for k in new}
        return loss(new, qx, qy)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_task = torch.compile(grad(loss_for_task), fullgraph=True)
    per_task(params, *(t[0] for t in batch))
    print(f"compile, per-task function: {time.perf_counter() - start:.0f} s")
    eager_task = grad(loss_for_task)
    one = tuple(t[0] for t in batch)
    print("one task, one thread:", interleaved({"eager (functorch)": lambda: eager_task(params, *one),
                                                "compiled": lambda: per_task(params, *one)}, rounds=12))
    torch.set_num_threads(threads)

    def compiled_on_threads():
        torch.set_num_threads(1)

        def share(indices):
            return [per_task(params, *(t[i] for t in batch)) for i in indices]

        with ThreadPoolExecutor(threads) as pool:
            parts = [g for part in pool.map(share, [range(w, s.tasks, threads) for w in range(threads)]) for g in part]
        torch.set_num_threads(threads)
        return {k: sum(g[k] for g in parts) / s.tasks for k in parts[0]}

    start = time.perf_counter()
    batched = torch.compile(grad(lambda p, *t: vmap(loss_for_task, in_dims=(None, 0, 0, 0, 0))(p, *t).mean()),
                            fullgraph=True)
    batched(params, *batch)
    print(f"compile, vmap over tasks: {time.perf_counter() - start:.0f} s")
    print("gradient agreement (float32, relative):",
          f"{relative_error(batched(params, *batch), compiled_on_threads()):.1e}")
    print("32 tasks, torch's thread count:", interleaved({
        "loop_threads (full meta-step)": ours(model, s, batch, "loop_threads"),
        "compiled per task on threads": compiled_on_threads,
        "compiled vmap": lambda: batched(params, *batch)}))


# ---- the stride-2 convolution's backward, and channels-last ----------------------------------------
def probe_conv_backward() -> None:
    """One thread, Conv4's second layer (64 -> 64 channels, 14x14 -> 7x7, stride 2) for one 5w5s task set (25
    images): the input gradient (backward-data) against the forward, stride 1, and channels-last tensors; then
    the whole model in channels-last under the autograd loop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    channels_last = torch.channels_last
    for batch in (5, 25, 100):
        x, w = torch.randn(batch, 64, 14, 14), torch.randn(64, 64, 3, 3)
        row = {}
        for stride in (2, 1):
            gy = torch.randn_like(F.conv2d(x, w, stride=stride, padding=1))
            flop = 2 * gy.numel() * 64 * 9

            def backward(mask, gy=gy, x=x, w=w, stride=stride):
                return torch.ops.aten.convolution_backward(gy, x, w, None, [stride] * 2, [1, 1], [1, 1], False,
                                                           [0, 0], 1, mask)

            cl = (gy.contiguous(memory_format=channels_last), x.contiguous(memory_format=channels_last),
                  w.contiguous(memory_format=channels_last))
            ms = interleaved({
                "forward": lambda x=x, w=w, stride=stride: F.conv2d(x, w, stride=stride, padding=1),
                "grad_input": lambda backward=backward: backward([True, False, False]),
                "grad_input NHWC": lambda backward=backward, cl=cl: backward([True, False, False], *cl),
                "grad_weight": lambda backward=backward: backward([False, True, False]),
            }, rounds=21)
            row[f"stride {stride}"] = {k: f"{v:.2f} ms ({flop / v / 1e6:.0f} GFLOP/s)" for k, v in ms.items()}
        print(f"{batch} images:", row)
    torch.set_num_threads(threads)


# ---- what the second core gives ------------------------------------------------------------------
def probe_thread_scaling() -> None:
    """learn2learn's loop and our autograd loop (the same kernels) on 1 and 2 torch threads, against
    loop_threads (tasks split over 2 threads, 1 thread each). Full meta-steps, interleaved medians."""
    for ways, shots, tasks, steps in ((5, 5, 32, 1), (20, 1, 16, 5)):
        s, batch, model, _ = setup(ways, shots, tasks, steps)
        loops = {"learn2learn": learn2learn_maml(model, s, batch),
                 "loop_autograd": ours(model, s, batch, "loop_autograd")}

        ms = interleaved({**{f"{k}, 1 thread": on_threads(1, f) for k, f in loops.items()},
                          **{f"{k}, 2 threads": on_threads(2, f) for k, f in loops.items()},
                          "loop_threads (2 workers)": ours(model, s, batch, "loop_threads")}, rounds=4)
        print(s.name, {k: f"{v:.0f} ms" for k, v in ms.items()})
        print("  learn2learn, 1 -> 2 threads:", f"{ms['learn2learn, 1 thread'] / ms['learn2learn, 2 threads']:.2f}x;",
              "loop_threads against our loop on 1 thread:",
              f"{ms['loop_autograd, 1 thread'] / ms['loop_threads (2 workers)']:.2f}x;",
              "learn2learn (2 threads) / loop_threads:",
              f"{ms['learn2learn, 2 threads'] / ms['loop_threads (2 workers)']:.2f}x")


# ---- the first inner step of all tasks as one batch (the weights are still shared) -----------------
def shared_first_grads(params: dict, support_x: torch.Tensor, support_y: torch.Tensor) -> dict:
    """Every task's support gradient at the shared initialization of the strided Conv4 with task BN, from one
    batch of all support sets: autograd to the layer outputs (``create_graph``), then per-task contractions
    (unfold + einsum for the convolutions). Exact and twice differentiable."""
    tasks, n = support_x.shape[:2]
    h, saved = rearrange(support_x, "t n c h w -> (t n) c h w"), []
    for layer in range(4):
        p = {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"features.{layer}.")}
        z = F.conv2d(h, p["conv.weight"], p["conv.bias"], stride=2, padding=1)
        centered = rearrange(z, "(t n) c h w -> t n c h w", t=tasks)
        centered = centered - centered.mean((1, 3, 4), keepdim=True)
        x_hat = centered * torch.rsqrt((centered * centered).mean((1, 3, 4), keepdim=True) + 1e-5)
        y = x_hat * rearrange(p["norm.weight"], "c -> c 1 1") + rearrange(p["norm.bias"], "c -> c 1 1")
        saved.append((h, z, x_hat, y))
        h = torch.relu(rearrange(y, "t n c h w -> (t n) c h w"))
    features = h.mean((2, 3))
    logits = F.linear(features, params["head.weight"], params["head.bias"])
    loss = F.cross_entropy(logits, rearrange(support_y, "t n -> (t n)"), reduction="sum") / n  # sum of task means
    d = torch.autograd.grad(loss, [s[1] for s in saved] + [s[3] for s in saved] + [logits], create_graph=True)
    grads = {}
    for layer, ((h_in, _, x_hat, _), dz, dy) in enumerate(zip(saved, d[:4], d[4:8])):
        cols = rearrange(F.unfold(h_in, 3, padding=1, stride=2), "(t n) k l -> t n k l", t=tasks)
        dz = rearrange(dz, "(t n) o a b -> t n o (a b)", t=tasks)
        weight = torch.einsum("tnkl,tnol->tok", cols, dz)
        grads[f"features.{layer}.conv.weight"] = weight.reshape(tasks, *params[f"features.{layer}.conv.weight"].shape)
        grads[f"features.{layer}.conv.bias"] = dz.sum((1, 3))
        grads[f"features.{layer}.norm.weight"] = (dy * x_hat).sum((1, 3, 4))
        grads[f"features.{layer}.norm.bias"] = dy.sum((1, 3, 4))
    d_logits = rearrange(d[8], "(t n) w -> t n w", t=tasks)
    grads["head.weight"] = torch.einsum("tnw,tnc->twc", d_logits, rearrange(features, "(t n) c -> t n c", t=tasks))
    grads["head.bias"] = d_logits.sum(1)
    return grads


def probe_shared_first_step() -> None:
    """One-step second-order MAML (SGD inner rule) with the first inner step of all tasks fused into one batch,
    the query losses then per task (a loop, one backward of their sum), against the library's drivers. Two
    ways to get the per-task support gradients: explicit per-task contractions (above), and ``vmap(grad)`` with
    unbatched weights (functorch folds the tasks into the batch of each forward convolution)."""
    for ways, shots, queries, tasks_ in ((5, 5, 5, 4), (5, 5, 5, 32), (5, 1, 1, 32)):
        s = Setting(ways, shots, queries, tasks_, 1, False)
        batch = random_tasks(s, torch.device("cpu"), torch.Generator().manual_seed(0))
        model = initialize(Conv4(ways), torch.Generator().manual_seed(1))
        learner = meta.MetaLearner(model, meta.sgd(lr=s.lr), inner_steps=1)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        forward = meta.models.functional_forward(model)
        sx, sy, qx, qy = batch

        def vmapped_first_grads(leaves, sx, sy, forward=forward, buffers=buffers):
            def support_loss(p, x, y):
                return F.cross_entropy(forward(p, buffers, x), y)
            return vmap(grad(support_loss), in_dims=(None, 0, 0))(leaves, sx, sy)

        def fused(first_grads, params=params, s=s, batch=batch, forward=forward, buffers=buffers):
            sx, sy, qx, qy = batch
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            with torch.enable_grad():
                g0 = first_grads(leaves, sx, sy)
                total = sum(F.cross_entropy(forward({k: leaves[k] - s.lr * g0[k][i] for k in leaves}, buffers, qx[i]),
                                            qy[i]) for i in range(len(qx)))
                return dict(zip(leaves, torch.autograd.grad(total / len(qx), list(leaves.values()))))

        reference = learner.meta_gradient(batch, driver="loop").grads
        errors = {name: relative_error(fused(first_grads), reference)
                  for name, first_grads in (("explicit", shared_first_grads), ("vmap(grad)", vmapped_first_grads))}
        errors["library vmap driver"] = relative_error(learner.meta_gradient(batch, driver="vmap").grads, reference)
        print(f"{s.name}, float32, relative to the loop driver (float32 rounding of this setting):",
              {k: f"{v:.1e}" for k, v in errors.items()})
        ms = interleaved({
            **{driver: lambda learner=learner, batch=batch, driver=driver: learner.meta_gradient(batch, driver=driver)
               for driver in ("loop_autograd", "loop_threads", "vmap_autograd")},
            "fused first step (explicit) + query loop": lambda fused=fused: fused(shared_first_grads),
            "fused first step (vmap(grad)) + query loop": lambda f=fused, g=vmapped_first_grads: f(g),
        }, rounds=4)
        print(s.name, {k: f"{v:.0f} ms" for k, v in ms.items()})

    # float64 exactness of the explicit per-task contractions, and where the fused time goes
    s = Setting(5, 5, 5, 8, 1, False)
    sx, sy, _, _ = random_tasks(s, torch.device("cpu"), torch.Generator().manual_seed(0))
    model = initialize(Conv4(5), torch.Generator().manual_seed(1)).double()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    forward = meta.models.functional_forward(model)
    with torch.enable_grad():
        explicit = shared_first_grads(params, sx.double(), sy)
        looped = [dict(zip(params, torch.autograd.grad(F.cross_entropy(forward(params, {}, sx[i].double()), sy[i]),
                                                       list(params.values()), create_graph=True)))
                  for i in range(len(sx))]
        looped = {k: torch.stack([g[k] for g in looped]) for k in params}
        v = {k: torch.randn(g.shape, generator=torch.Generator().manual_seed(2), dtype=g.dtype)
             for k, g in looped.items()}
        hvp = [dict(zip(params, torch.autograd.grad(list(g.values()), list(params.values()), [v[k] for k in g])))
               for g in (explicit, looped)]
    explicit, looped = ({k: v.detach() for k, v in g.items()} for g in (explicit, looped))
    print("8 tasks, float64: per-task gradients", f"{relative_error(explicit, looped):.1e},",
          f"their vector-Jacobian product {relative_error(*hvp):.1e} relative to a per-task loop")
    s = Setting(5, 5, 5, 32, 1, False)
    sx, sy, _, _ = random_tasks(s, torch.device("cpu"), torch.Generator().manual_seed(0))
    model = initialize(Conv4(5), torch.Generator().manual_seed(1))
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    with torch.profiler.profile() as profile, torch.enable_grad():
        g0 = shared_first_grads(params, sx, sy)
        torch.autograd.grad(list(g0.values()), list(params.values()), [torch.ones_like(g) for g in g0.values()])
    print(f"{s.name}, support side only (first gradients + their vector-Jacobian product), profile by op:")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


# ---- a floor from the convolution kernels alone ----------------------------------------------------
#: aten ops that do the matrix work of Conv4 and its head (forward, backward and double backward)
MATRIX_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
              "aten::_slow_conv2d_backward", "aten::slow_conv_transpose2d", "aten::slow_conv_dilated2d",
              "aten::mm", "aten::addmm", "aten::bmm")


def probe_kernel_floor() -> None:
    """How fast could any exact per-task strategy with PyTorch's kernels be? The autograd loop on one thread,
    profiled: time in the convolution and matmul kernels (self time) against everything else. Perfect use of both
    cores with free elementwise work would take half the kernel time; twice learn2learn needs half of
    learn2learn's (two-thread) time, measured in the same run."""
    for ways, shots, tasks_, steps in ((5, 5, 32, 1), (20, 1, 16, 5), (20, 5, 16, 5)):
        s, batch, model, learner = setup(ways, shots, tasks_, steps)
        l2l, loop = learn2learn_maml(model, s, batch), ours(model, s, batch, "loop_autograd")

        ms = interleaved({"learn2learn (2 threads)": l2l, "loop_autograd (1 thread)": on_threads(1, loop),
                          "loop_threads": ours(model, s, batch, "loop_threads")}, rounds=4)
        torch.set_num_threads(1)
        with torch.profiler.profile() as profile:
            start = time.perf_counter()
            loop()
            wall = 1000 * (time.perf_counter() - start)
        torch.set_num_threads(2)
        events = profile.key_averages()
        kernels = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_OPS) / 1000
        total = sum(e.self_cpu_time_total for e in events) / 1000
        missed = sorted({e.key for e in events if ("conv" in e.key or "mm" in e.key) and e.key not in MATRIX_OPS
                         and e.key.startswith("aten::") and e.self_cpu_time_total > 0})
        # the profiler slows small ops more than big kernels, so this fraction errs low (the floor too)
        fraction = kernels / total
        floor, budget = fraction * ms["loop_autograd (1 thread)"] / 2, ms["learn2learn (2 threads)"] / 2
        print(s.name, {k: f"{v:.0f} ms" for k, v in ms.items()})
        print(f"  one thread, profiled ({wall:.0f} ms): convolution/matmul kernels {100 * fraction:.0f}% of the time"
              f" (other conv/mm ops with self time: {missed or 'none'});")
        print(f"  floor on two cores with free elementwise work {floor:.0f} ms; twice learn2learn needs {budget:.0f} ms"
              f" (floor / budget {floor / budget:.2f})")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    {"compile": probe_compile, "conv_backward": probe_conv_backward, "thread_scaling": probe_thread_scaling,
     "shared_first_step": probe_shared_first_step, "kernel_floor": probe_kernel_floor}[sys.argv[1]]()
