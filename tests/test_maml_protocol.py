"""cbfinn/maml's protocol knobs: the inner loss summed over shots, its batch norm (beta only, eps 1e-3, not
inner-adapted) and its weight init, in the model core, the config and the MAML presets."""

from __future__ import annotations

import pytest
import torch

import meta
from meta import rules
from meta.models import build_model, norm_parameters_of, relative_error
from meta.training.builders import build_inner_rule, build_learner
from meta.training.config import ConfigError, load_config
from tests.helpers import random_tasks

TOL = 1e-10  # same math in another summation order: ~1e-15 apart, >= 100x margin on every path (docs/numerics.md)
WAYS, SHOTS = 5, 3


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=3, ways=WAYS, shots=SHOTS, queries=2, size=8)


def learner_for(rule: meta.InnerRule, reduction: str, norm: str = "task_bn", steps: int = 1,
                batch_size: int | None = None) -> meta.MetaLearner:
    model = meta.build_model("mlp", ways=WAYS, norm=norm, image_size=8,
                             generator=torch.Generator().manual_seed(0)).double()
    return meta.MetaLearner(model, rule, inner_steps=steps, inner_loss_reduction=reduction,
                            inner_batch_size=batch_size)


@pytest.mark.parametrize("driver", ["loop", "vmap"])
def test_sum_over_shots_first_step_is_a_step_of_ways_times_lr_on_the_mean(tasks, driver):
    """cbfinn/maml's inner loss sum(CE) / K differentiates to N x the mean's gradient (K = 3 shots here, so a
    scale of N * K or K would fail)."""
    lr = 0.1
    summed = learner_for(meta.sgd(lr=lr), "sum_over_shots").meta_gradient(tasks, driver=driver)
    mean = learner_for(meta.sgd(lr=WAYS * lr), "mean").meta_gradient(tasks, driver=driver)
    assert relative_error(summed.adapted, mean.adapted) < TOL
    assert relative_error(summed.grads, mean.grads) < TOL
    same_lr = learner_for(meta.sgd(lr=lr), "mean").meta_gradient(tasks, driver=driver)
    assert relative_error(summed.adapted, same_lr.adapted) > 1e-4  # the knob changes the step


def test_sum_over_shots_on_inner_mini_batches_is_the_batch_sum_over_shots(tasks):
    """With inner mini-batches of b examples the loss is the batch's sum / K: b / K times its mean."""
    learner = learner_for(meta.sgd(lr=0.1), "sum_over_shots", batch_size=5)  # 15 support examples, K = 3
    mean = learner_for(meta.sgd(lr=0.1 * 5 / SHOTS), "mean", batch_size=5)
    assert relative_error(learner.meta_gradient(tasks).adapted, mean.meta_gradient(tasks).adapted) < TOL


def test_sum_over_shots_for_per_sample_rules_scales_each_samples_gradient(tasks):
    """A per-sample rule gets each sample's gradient times the same factor, so that their mean is the gradient
    of the summed loss: clipped SGD with a bound that never binds is SGD on the sum."""
    clipped = learner_for(rules.clipped_sgd(lr=0.1, clip=1e12), "sum_over_shots", norm="group")
    sgd = learner_for(meta.sgd(lr=0.1), "sum_over_shots", norm="group")
    assert relative_error(clipped.meta_gradient(tasks).adapted, sgd.meta_gradient(tasks).adapted) < TOL
    # the bound applies to the scaled gradients: one twice the largest per-sample norm never binds on the mean's
    # gradients but binds on the N = 5 times larger ones
    rows = meta.per_sample_grads(clipped.model, tasks[0][0], tasks[1][0])
    clip = 2 * float(torch.sqrt(sum(r.flatten(1).pow(2).sum(1) for r in rows.values())).max())
    first = lambda result: {k: v[0] for k, v in result.adapted.items()}  # noqa: E731 (the task of `rows`)
    plain = learner_for(rules.clipped_sgd(lr=0.1, clip=clip), "mean", norm="group").meta_gradient(tasks)
    mean_sgd = learner_for(meta.sgd(lr=0.1), "mean", norm="group").meta_gradient(tasks)
    assert relative_error(first(plain), first(mean_sgd)) < TOL
    scaled = learner_for(rules.clipped_sgd(lr=0.1, clip=clip), "sum_over_shots", norm="group").meta_gradient(tasks)
    assert relative_error(first(scaled), first(sgd.meta_gradient(tasks))) > 1e-6


def test_unknown_reduction_is_refused(tasks):
    with pytest.raises(ValueError, match="unknown inner loss reduction 'total'"):
        learner_for(meta.sgd(), "total").meta_gradient(tasks)


@pytest.mark.parametrize("affine,names", [("gamma_beta", {"weight", "bias"}), ("beta", {"bias"}), ("none", set())])
def test_task_batch_norm_affine_kinds_and_eps(affine, names):
    norm = meta.TaskBatchNorm(4, eps=1e-3, affine=affine).double()
    assert {n for n, _ in norm.named_parameters()} == names
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.5)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-3)
    if "weight" in names:
        expected = expected * norm.weight.view(1, -1, 1, 1)
    if "bias" in names:
        expected = expected + norm.bias.view(1, -1, 1, 1)
    for fused in (True, False):  # the fused CPU kernel and the primitives give the same values
        norm.use_fused_kernel = fused
        assert torch.allclose(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.vmap(norm)(x.unsqueeze(0)).squeeze(0), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown norm affine"):
        meta.TaskBatchNorm(4, affine="gamma")


def test_norm_knobs_reach_the_model_from_the_config():
    cfg = load_config(["model.norm_affine=beta", "model.norm_eps=0.001"])
    model = build_learner(cfg, torch.float32, torch.device("cpu")).model
    norms = [m for m in model.modules() if isinstance(m, meta.TaskBatchNorm)]
    assert len(norms) == 4 and all(m.eps == 1e-3 and m.weight is None and m.bias is not None for m in norms)
    assert norm_parameters_of(model) == {f"features.{i}.norm.bias" for i in range(4)}
    with pytest.raises(ConfigError, match="model.norm_affine=beta needs model.norm=task_bn"):
        load_config(["model.norm_affine=beta", "model.norm=group"])
    with pytest.raises(ConfigError, match="model.norm_eps must be positive"):
        load_config(["model.norm_eps=0"])


@pytest.mark.parametrize("rule", ["sgd", "metasgd"])
def test_norms_not_inner_adapted_are_meta_learned_only(tasks, rule):
    """inner.adapt_norm=false masks the rule (meta.rules.masked): norm parameters keep their value through the
    inner loop, still get a meta-gradient, and the rest matches a hand-masked rule."""
    cfg = load_config([f"inner.rule={rule}", "inner.adapt_norm=false", "model.name=mlp", "data.image_size=8",
                       "inner.steps=2", "dtype=float64"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    assert learner.rule.name == f"frozen_norm({rule})"
    frozen = norm_parameters_of(learner.model)
    assert frozen == {f"features.{i}.{w}" for i in (2, 5, 8, 11) for w in ("weight", "bias")}
    result = learner.meta_gradient(tasks, driver="vmap")
    params = dict(learner.model.named_parameters())
    for name in frozen:
        assert torch.equal(result.adapted[name], params[name].detach().expand_as(result.adapted[name]))
        assert result.grads[name].abs().max() > 1e-8  # meta-learned
    assert (result.adapted["head.weight"] - params["head.weight"]).abs().max() > 1e-6
    by_hand = meta.masked(meta.build_rule(rule, lr=cfg.inner.lr), lambda name: name not in frozen)
    expected = meta.MetaLearner(learner.model, by_hand, inner_steps=2)
    adapted = meta.MetaLearner(learner.model, meta.build_rule(rule, lr=cfg.inner.lr), inner_steps=2)
    for other in (expected, adapted):  # the same rates (built in float32, then cast, by build_learner)
        other.rule_params.load_state_dict(learner.rule_params.state_dict())
    assert relative_error(result.grads, expected.meta_gradient(tasks, driver="loop").grads) < TOL
    assert relative_error(adapted.meta_gradient(tasks).grads, result.grads) > 1e-4  # the mask matters
    # the test-time rule is masked too
    assert build_inner_rule(cfg, test=True).adapts("features.2.weight") is False


def test_maml_init_follows_construct_conv_and_fc_weights():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    conv = meta.build_model("conv4", ways=20, generator=g(), init="maml")
    xavier = meta.build_model("conv4", ways=20, generator=g(), init="xavier")
    # conv weights Glorot-uniform as before (same draws), head N(0, 1) instead, every bias zero
    for i in range(4):
        assert torch.equal(conv.features[i].conv.weight, xavier.features[i].conv.weight)
        assert not conv.features[i].conv.bias.any()
    head = conv.head.weight.detach()
    assert abs(float(head.std()) - 1.0) < 0.1 and float(head.abs().max()) > 2.0  # xavier's bound is 0.27
    assert not conv.head.bias.any()
    mlp = meta.build_model("mlp", ways=5, generator=g(), init="maml")
    for layer in (*(mlp.features[i] for i in (1, 4, 7, 10)), mlp.head):
        w = layer.weight.detach()
        assert float(w.abs().max()) <= 0.02  # tf.truncated_normal cuts at two standard deviations
        assert 0.007 < float(w.std()) < 0.0095  # std of N(0, 0.01) truncated at 2 sigma: 0.0088
        assert not layer.bias.any()
    again = meta.build_model("mlp", ways=5, generator=g(), init="maml")
    assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), again.parameters()))
    cfg = load_config(["model.init=maml"])
    expected = meta.build_model("conv4", 5, generator=torch.Generator().manual_seed(0), init="maml")
    assert torch.equal(build_learner(cfg, torch.float32, torch.device("cpu")).model.head.weight, expected.head.weight)
    with pytest.raises(ConfigError, match="model.init='lecun' is not one of"):
        load_config(["model.init=lecun"])


def test_inner_loss_reduction_key_reaches_the_learner_and_refuses_other_algorithms():
    cfg = load_config(["inner.loss_reduction=sum_over_shots"])
    assert build_learner(cfg, torch.float32, torch.device("cpu")).inner_loss_reduction == "sum_over_shots"
    for algorithm in ("imaml", "protonets"):
        with pytest.raises(ConfigError, match="inner.loss_reduction=sum_over_shots applies to"):
            load_config([f"algorithm={algorithm}", "inner.loss_reduction=sum_over_shots"])
    with pytest.raises(ConfigError, match="inner.loss_reduction='total' is not one of"):
        load_config(["inner.loss_reduction=total"])


def test_conv4_head_reads_the_spatial_mean_or_the_flattened_features():
    """model.conv4_head: MAML's head reads the spatial mean of the 64 maps, Reptile's the flattened 2x2x64."""
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    mean = build_model("conv4", 5, generator=torch.Generator().manual_seed(1))
    flat = build_model("conv4", 5, generator=torch.Generator().manual_seed(1), conv4_head="flatten")
    assert mean.head.in_features == 64 and flat.head.in_features == 256
    maps = flat.features(x)
    assert maps.shape[1:] == (64, 2, 2)
    torch.testing.assert_close(flat.embed(x), maps.flatten(1))
    torch.testing.assert_close(mean.embed(x), mean.features(x).mean(dim=(2, 3)))
    assert flat(x).shape == (3, 5)
    with pytest.raises(ValueError, match="conv4 model only"):
        build_model("mlp", 5, conv4_head="flatten")
    with pytest.raises(ConfigError, match="model.conv4_head=flatten applies to model.name=conv4 only"):
        load_config(["model.name=conv4_maxpool", "model.conv4_head=flatten"])
    assert load_config(["preset=reptile_omniglot_5w1s"]).model.conv4_head == "flatten"
    assert load_config(["preset=maml_omniglot_5w1s"]).model.conv4_head == "mean"


# ---- TensorFlow's 'SAME' padding (cbfinn/maml utils.py conv_block, supervised-reptile models.py L21) ---------


def tf_same_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """TF's conv2d(padding='SAME') written out: output side ceil(n / stride); window i starts at input row
    i * stride - pad_top with pad_top = total // 2, total = max((out - 1) * stride + k - n, 0); outside is zero."""
    n, k = x.shape[-1], weight.shape[-1]
    out = -(-n // stride)
    top = max((out - 1) * stride + k - n, 0) // 2
    result = torch.zeros(x.shape[0], weight.shape[0], out, out, dtype=x.dtype)
    for i in range(out):
        for j in range(out):
            for a in range(k):
                for b in range(k):
                    r, c = i * stride - top + a, j * stride - top + b
                    if 0 <= r < n and 0 <= c < n:
                        result[:, :, i, j] += torch.einsum("bc,oc->bo", x[:, :, r, c], weight[:, :, a, b])
    return result + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("side", [28, 14, 7, 4])
def test_tf_same_padding_equals_tensorflows_rule_and_differs_from_symmetric_at_even_sides(side):
    from meta.models.networks import ConvBlock

    g = torch.Generator().manual_seed(side)
    x = torch.randn(2, 3, side, side, generator=g, dtype=torch.float64)
    blocks = {p: ConvBlock(3, 4, "none", "stride", padding=p).double() for p in ("tf_same", "symmetric")}
    blocks["symmetric"].load_state_dict(blocks["tf_same"].state_dict())
    conv = blocks["tf_same"].conv
    expected = torch.relu(tf_same_reference(x, conv.weight, conv.bias, stride=2))
    got = {p: block(x) for p, block in blocks.items()}
    assert got["tf_same"].shape == got["symmetric"].shape == (2, 4, -(-side // 2), -(-side // 2))
    assert torch.allclose(got["tf_same"], expected, atol=1e-12)
    # an even side pads only the bottom and right, an odd one both sides alike: then the two paddings agree
    assert torch.equal(got["tf_same"], got["symmetric"]) == (side % 2 == 1)


def test_tf_same_meta_gradients_agree_under_vmap_and_loop_and_the_key_reaches_the_model(tasks):
    cfg = load_config(["preset=maml_omniglot_5w1s"])
    assert cfg.model.padding == "tf_same"
    model = build_model("conv4", ways=WAYS, norm="task_bn", image_size=8, padding="tf_same",
                        generator=torch.Generator().manual_seed(0)).double()
    assert all(block.tf_same for block in model.features)
    learner = meta.MetaLearner(model, meta.sgd(lr=0.3), inner_steps=2)
    vmap, loop = (learner.meta_gradient(tasks, driver=d) for d in ("vmap", "loop"))
    assert relative_error(vmap.grads, loop.grads) < TOL
    with pytest.raises(ConfigError, match="model.padding=tf_same applies to the conv models only"):
        load_config(["model.name=mlp", "model.padding=tf_same"])
    assert load_config(["preset=maml_mlp_omniglot_5w1s"]).model.padding == "symmetric"


# ---- MAML's task pool, read in order (cbfinn/maml data_generator.py make_data_tensor) --------------------------


def _rotated_pool():
    import dataclasses

    from meta.data import synthetic_pool

    return dataclasses.replace(synthetic_pool(12, 6, image_size=8, seed=0), rotations=(0, 90, 180, 270))


def test_in_order_task_pool_reads_its_tasks_in_order_from_first_task_with_fresh_rotations():
    from meta.data import TaskSampler

    pooled = TaskSampler(_rotated_pool(), 3, 1, 1, task_pool=5, task_pool_seed=2, task_pool_order="in_order")
    g = torch.Generator().manual_seed(0)
    for first_task, expected in ((0, [0, 1, 2]), (3, [3, 4, 0, 1]), (12, [2, 3])):  # wraps around the pool's end
        idx = pooled.sample_indices(len(expected), g, first_task=first_task)
        assert torch.equal(idx.classes, pooled.pool_classes[expected].long())
        assert torch.equal(idx.drawings, pooled.pool_drawings[expected].long())
    # a task read twice keeps its classes, labels and drawings and gets fresh rotations (data_generator.py L138)
    twice = pooled.sample_indices(200, torch.Generator().manual_seed(1), first_task=0)  # 40 passes over 5 tasks
    assert torch.equal(twice.classes[0], twice.classes[5]) and torch.equal(twice.drawings[0], twice.drawings[5])
    assert len({tuple(twice.rotations[i].tolist()) for i in range(0, 200, 5)}) > 1
    # the same pool as the random order reads (the pool is a function of task_pool_seed only)
    random_order = TaskSampler(_rotated_pool(), 3, 1, 1, task_pool=5, task_pool_seed=2)
    assert torch.equal(random_order.pool_classes, pooled.pool_classes)
    with pytest.raises(ValueError, match="first_task"):
        pooled.sample_indices(2, g, first_task=-1)
    with pytest.raises(ValueError, match="task_pool is None"):
        TaskSampler(_rotated_pool(), 3, 1, 1, task_pool_order="in_order")
    with pytest.raises(ValueError, match="task_pool_order"):
        TaskSampler(_rotated_pool(), 3, 1, 1, task_pool=5, task_pool_order="sorted")


def test_maml_presets_read_a_200000_task_pool_in_order_and_the_key_needs_a_pool():
    from meta.training.builders import build_samplers

    for preset in ("maml_omniglot_5w1s", "maml_omniglot_5w5s", "maml_omniglot_20w1s", "maml_omniglot_20w5s",
                   "fomaml_omniglot_5w1s", "fomaml_omniglot_20w5s", "maml_mlp_omniglot_5w1s", "maml_mlp_omniglot_5w5s"):
        cfg = load_config([f"preset={preset}"])
        assert (cfg.data.task_pool, cfg.data.task_pool_order) == (200000, "in_order"), preset
    cfg = load_config(["data.dataset=synthetic", "data.task_pool=7", "data.task_pool_order=in_order"])
    samplers = build_samplers(cfg, torch.device("cpu"))
    assert samplers["train"].task_pool_order == "in_order" and samplers["val"].task_pool is None
    with pytest.raises(ConfigError, match="data.task_pool_order") as error:
        load_config(["data.task_pool_order=in_order"])
    assert "\n" not in str(error.value)


def test_training_reads_the_in_order_pool_from_step_times_meta_batch(tmp_path, monkeypatch):
    """Steps of meta-batch 3 on a pool of 4 read from pool tasks 0, 3, 6 (= 0, 3, 2 mod 4): the training loop passes
    first_task = step * meta_batch, and a run resumed after step 1 continues the same stream with the same losses."""
    import json

    import meta
    from meta.data import TaskSampler

    common = ["data.dataset=synthetic", "data.task_pool=4", "data.task_pool_order=in_order", "train.meta_batch=3",
              "model.name=mlp", "dtype=float64", "driver=loop", "train.log_every=1", "train.val_every=100",
              "train.val_tasks=2", "eval.tasks=2", "progress=false", "train.checkpoint_every=1"]
    read_from: list[int] = []
    sample = TaskSampler.sample

    def recording_sample(self, num_tasks, generator, first_task=0):
        if self.task_pool is not None:
            read_from.append(first_task)
        return sample(self, num_tasks, generator, first_task)

    monkeypatch.setattr(TaskSampler, "sample", recording_sample)

    def run(out, *extra):
        args = [*common, f"out_dir={out}", *extra]
        meta.train(meta.load_config(overrides=args), overrides=args)  # what scripts/train_maml.py runs
        records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [{k: r[k] for k in ("step", "loss", "accuracy")} for r in records if r["split"] == "train"]

    whole = run(tmp_path / "whole", "train.iterations=3")
    assert read_from == [0, 3, 6]
    read_from.clear()
    run(tmp_path / "part", "train.iterations=1")
    resumed = run(tmp_path / "part", "train.iterations=3", "resume=true")
    assert read_from == [0, 3, 6] and resumed == whole


# ---- the test accuracy after every inner step (cbfinn/maml main.py test(): one CSV column per step) ------------


@pytest.mark.parametrize("preset", ["maml_omniglot_5w1s", "metasgd_omniglot_5w1s", "mamlpp_omniglot_5w1s",
                                    "anil_omniglot_5w1s"])
def test_step_metrics_column_s_is_the_evaluation_after_s_inner_steps(tasks, preset):
    """One adaptation gives every column; column s must equal a separate evaluation with s inner steps (float64;
    the same operations on the same values, so equal up to the last bit, up to rounding in the vmapped batch)."""
    from meta.evaluation import records_every_step, step_metrics

    cfg = load_config([f"preset={preset}", "data.dataset=synthetic", "data.image_size=8", "model.name=mlp",
                       "model.padding=symmetric", "inner.test_steps=4"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    assert records_every_step(learner)
    rule = build_inner_rule(cfg, test=True)
    losses, accuracies = step_metrics(learner, tasks, inner_steps=4, rule=rule)
    assert losses.shape == accuracies.shape == (tasks[0].shape[0], 5)
    for s in range(5):
        loss, accuracy = learner.evaluate(tasks, inner_steps=s, rule=rule)
        assert torch.equal(accuracies[:, s], accuracy)
        torch.testing.assert_close(losses[:, s], loss, rtol=1e-13, atol=0)
    assert not torch.equal(losses[:, 0], losses[:, -1])  # the columns differ: adaptation changes the query loss


def test_per_step_record_in_the_test_result_and_refused_where_adaptation_is_not_the_plain_loop():
    from meta.data import synthetic_pool
    from meta.data.sampler import TaskSampler
    from meta.evaluation import evaluate_learner, records_every_step

    cfg = load_config(["preset=maml_omniglot_5w1s", "data.dataset=synthetic", "data.image_size=8", "model.name=mlp",
                       "model.padding=symmetric", "inner.test_steps=3"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    sampler = TaskSampler(synthetic_pool(10, 4, image_size=8), 5, 1, 1)
    common = {"num_tasks": 12, "seed": 3, "batch_size": 5, "inner_steps": 3, "dtype": torch.float64}
    plain = evaluate_learner(learner, sampler, **common)
    stepped = evaluate_learner(learner, sampler, per_step=True, **common)
    assert [s["step"] for s in stepped["steps"]] == [0, 1, 2, 3]
    last = stepped.pop("steps")[-1]
    assert stepped == plain and (last["accuracy"], last["ci95"]) == (plain["accuracy"], plain["ci95"])
    proto = build_learner(load_config(["preset=protonets_omniglot_5w1s", "data.dataset=synthetic",
                                       "data.image_size=16"]), torch.float64, torch.device("cpu"))
    assert not records_every_step(proto) and not records_every_step([learner, learner])
    assert not records_every_step(learner, transductive=False)
    with pytest.raises(ValueError, match="per_step"):
        evaluate_learner(proto, sampler, per_step=True, **common)


BORROW_MAMLS_ALPHA = ["metasgd_omniglot_5w1s", "metasgd_omniglot_5w5s", "metasgd_omniglot_20w1s",
                      "metasgd_omniglot_20w5s", "anil_omniglot_5w1s", "anil_omniglot_20w1s", "anil_omniglot_20w5s",
                      "metacurvature_omniglot_5w1s", "clipped_sgd_omniglot_5w1s"]


@pytest.mark.parametrize("preset", BORROW_MAMLS_ALPHA)
def test_presets_that_borrow_mamls_step_size_borrow_its_loss_scale(preset):
    """MAML's alpha (0.4 at 5-way, 0.1 at 20-way) steps on cbfinn/maml's loss summed over the K shots; a preset
    borrowing the number on the mean loss would step N times less (20x for ANIL's fixed step at 20-way)."""
    cfg, maml = load_config([f"preset={preset}"]), load_config(["preset=maml_omniglot_5w1s"])
    assert cfg.inner.lr == (0.4 if cfg.task.ways == 5 else 0.1)
    assert cfg.inner.loss_reduction == maml.inner.loss_reduction == "sum_over_shots"


# ---- citations of cbfinn/maml and MAML's alpha on a mean loss ---------------------------------------------------


def _preset_lines(preset: str) -> list[str]:
    from meta.training.config import CONFIG_DIR

    return (CONFIG_DIR / f"{preset}.yaml").read_text().splitlines()


def test_the_omniglot_data_generator_is_cited_at_main_py_l251_not_the_sinusoid_branch():
    """cbfinn/maml main.py L237-238 is the sinusoid branch (DataGenerator for FLAGS.datasource == 'sinusoid'); the
    Omniglot one, DataGenerator(FLAGS.update_batch_size*2, ...), is L251."""
    from meta.training.config import available_presets

    cited = {p: line for p in available_presets() for line in _preset_lines(p) if "DataGenerator(" in line}
    assert {"maml_omniglot_5w1s", "maml_omniglot_5w5s", "maml_omniglot_20w5s", "maml_mlp_omniglot_5w5s"} <= set(cited)
    assert all("main.py:L251" in line and "L238" not in line for line in cited.values()), cited


def test_no_spec_credits_cbfinn_mamls_readme_with_commands():
    """cbfinn/maml's README.md has no commands (L16: "see the usage instructions at the top of main.py"); the
    40,000-iteration Omniglot lines were main.py's usage text before a7f45f1 made them 60,000."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "experiments/tables/maml_omniglot.yaml").read_text()
    assert "README commands" not in text and "a7f45f1" in text and "README.md L16" in text


@pytest.mark.parametrize("preset", ["omniglot_5w1s_quick", "mnist_cross_domain_5w1s", "mnist_cross_domain_10w1s",
                                    "mnist_cross_domain_5w5s", "mnist_within_5w1s"])
def test_presets_with_mamls_lr_on_the_mean_loss_say_so(preset):
    """These presets take MAML's 0.4 with the library's mean inner loss, not cbfinn/maml's loss summed over the K
    shots (N x the step on the mean): the lr line of the file that sets it says so, and none claims MAML's protocol."""
    from meta.training.config import preset_layers

    cfg = load_config([f"preset={preset}"])
    assert (cfg.inner.lr, cfg.inner.loss_reduction) == (0.4, "mean")
    setter = next(name for name, layer in reversed(preset_layers(preset)) if "lr" in layer.get("inner", {}))
    lr_line = next(line for line in _preset_lines(setter) if line.strip().startswith("lr:"))
    assert "mean" in lr_line.lower() and "sum_over_shots" in " ".join(_preset_lines(setter)), (setter, lr_line)
    assert not any("Same protocol as maml_omniglot_5w1s" in line for line in _preset_lines(preset))
