"""MAML on Omniglot 5-way 1-shot in one file, top to bottom: read this first.

Everything the library does for one training step is here in plain torch.func: a per-task loss (adapt on the
support set with SGD, score on the query set), ``vmap(grad(...))`` over a batch of tasks, an Adam step on the mean
meta-gradient, and evaluation on held-out characters. Only the model (``meta.build_model``: MAML's Conv4 with
task batch norm) and the data (``meta.data``: Omniglot's characters, an N-way K-shot task sampler) come from the
library. ``meta.MetaLearner`` computes the same meta-gradient (tests/test_example.py checks it in float64) and
adds drivers, rules, algorithms, checkpoints and confidence intervals.

    python examples/maml_in_one_file.py --iterations 2000     # needs Omniglot under $META_DATA_ROOT
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import meta
from meta.data import ClassPool, TaskSampler, evaluation_tasks, load_omniglot

WAYS, SHOTS, QUERIES = 5, 1, 1  # 5-way 1-shot, as MAML's Omniglot experiment
INNER_LR, INNER_STEPS, TEST_STEPS = 0.4, 1, 3  # SGD inside each task
META_BATCH, META_LR = 32, 1e-3  # tasks per outer step, Adam's learning rate


def task_loss(model, params, buffers, task, steps=INNER_STEPS, lr=INNER_LR):
    """One task: ``steps`` of SGD from ``params`` on its support set, then the query loss (and accuracy)."""
    support_x, support_y, query_x, query_y = task

    def support_loss(fast):
        return F.cross_entropy(functional_call(model, (fast, buffers), (support_x,)), support_y)

    fast = params
    for _ in range(steps):
        grads = grad(support_loss)(fast)  # second order: the outer grad differentiates through this one
        fast = {name: fast[name] - lr * grads[name] for name in fast}
    logits = functional_call(model, (fast, buffers), (query_x,))
    accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
    return F.cross_entropy(logits, query_y), accuracy


def meta_gradient(model, tasks, steps=INNER_STEPS, lr=INNER_LR):
    """The gradient of the mean query loss over a batch of tasks (tensors ``[tasks, examples, ...]``) with
    respect to the initialization, and each task's query loss and accuracy."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_and_metrics(params, task):  # grad differentiates the first output; the rest rides along
        loss, accuracy = task_loss(model, params, buffers, task, steps, lr)
        return loss, (loss, accuracy)

    per_task = vmap(grad(loss_and_metrics, has_aux=True), in_dims=(None, 0))  # one task per vmap lane
    grads, (losses, accuracies) = per_task(params, tuple(tasks))
    return {name: g.mean(dim=0) for name, g in grads.items()}, losses, accuracies


def evaluate(model, sampler, num_tasks=600, steps=TEST_STEPS, seed=0):
    """Mean query accuracy after ``steps`` of adaptation on a fixed set of test tasks (no meta-gradient)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers, accuracies = dict(model.named_buffers()), []
    for batch in evaluation_tasks(sampler, num_tasks=num_tasks, seed=seed, batch_size=100):
        per_task = vmap(lambda task: task_loss(model, params, buffers, task, steps)[1])
        accuracies.append(per_task(tuple(batch)))
    return torch.cat(accuracies).mean().item()


def train(train_pool: ClassPool, test_pool: ClassPool, iterations: int, seed: int = 0, eval_tasks: int = 600):
    """Meta-train MAML's Conv4 on ``train_pool``; return (its model, the test accuracy on ``test_pool``)."""
    model = meta.build_model("conv4", ways=WAYS, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    sampler = TaskSampler(train_pool, WAYS, SHOTS, QUERIES)
    generator = torch.Generator().manual_seed(seed)  # the stream of training tasks
    for step in range(iterations):
        tasks = sampler.sample(META_BATCH, generator)
        grads, losses, accuracies = meta_gradient(model, tasks)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: query loss {losses.mean():.3f}, accuracy {accuracies.mean():.3f}")
    accuracy = evaluate(model, TaskSampler(test_pool, WAYS, SHOTS, QUERIES), num_tasks=eval_tasks)
    print(f"test accuracy after {iterations} iterations: {100 * accuracy:.2f}% over {eval_tasks} tasks")
    return model, accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--data-root", default=None, help="default: $META_DATA_ROOT")
    args = parser.parse_args()
    train(load_omniglot(args.data_root, "train"), load_omniglot(args.data_root, "test"), args.iterations)
