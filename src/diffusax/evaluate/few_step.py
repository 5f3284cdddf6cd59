"""`make eval` of a few-step student (methods "lcm", "add"): quality and speed against its
teacher.

For each step count K of ``eval.few_steps`` the student is sampled with its sampler (the
multistep consistency sampler) and the frozen teacher with DDIM at K steps; the teacher also at
``eval.teacher_steps`` (100). Each row has the Fréchet distance in the digits classifier's
features (``evaluate.run``'s metric, on as many samples as the held-out split has, and on all),
the class agreement of the samples with the labels they were drawn for, and the wall time per
image in steady state: the sampler is compiled and run once, then timed on a second run of the
same batches (compilation apart). The targets of the few-step methods are checked and written
beside the numbers (``targets``; a method passes its own as ``targets_fn``, and rows of
other runs' evaluations to show beside, as ``extra_rows``).
"""

from __future__ import annotations

import os
import time

import jax

from diffusax import inference, methods
from diffusax.evaluate import classifier as classifier_lib
from diffusax.evaluate import run as eval_run
from diffusax.evaluate.frechet import features_frechet_distance
from diffusax.train.build import open_split


def _timed_draw(generate, params, run, num, sample_cfg, key):
    """(images in [-1, 1], labels, seconds per image in steady state)."""
    conds, meta = run.method.sample_conditions(run, num, sample_cfg)
    draw = lambda: methods.generate_many(
        generate, params, num, sample_cfg.batch_size, run.data.num_classes, key, conditions=conds
    )[0]
    draw()  # compiles (and runs once)
    start = time.perf_counter()
    images = draw()
    seconds = time.perf_counter() - start
    return images, meta.get("labels"), seconds / num


def evaluate(cfg, workdir: str, *, targets_fn=None, extra_rows=(), teacher_guidance=None) -> dict:
    """Score the student of ``workdir`` and its teacher; writes ``workdir/eval/metrics.json``
    (atomically, once every number is computed). ``targets_fn(rows, floor, teacher_steps)``
    replaces ``targets``; ``extra_rows`` (scored by another run's evaluation) are listed after
    this run's rows, and the targets see this run's rows only."""
    eval_run.check_eval_config(cfg)
    steps = tuple(int(k) for k in cfg.eval.few_steps)
    if not steps or min(steps) < 1 or cfg.eval.teacher_steps < 1:
        raise ValueError("config fields 'eval.few_steps' / 'eval.teacher_steps' must be >= 1")
    t0 = time.time()
    trained = inference.load_trained(cfg, workdir)
    run = trained.run
    train_source = open_split(cfg, cfg.data.train_split)
    test_source = open_split(cfg, cfg.data.eval_split)
    clf = classifier_lib.load_or_train(
        train_source,
        test_source,
        os.path.join(workdir, "eval", f"classifier_{cfg.data.name}.npz"),
        steps=cfg.eval.classifier_steps,
        seed=cfg.seed,
    )
    train_features = clf.source_features(train_source)
    test_features = clf.features(classifier_lib.read_all(test_source)["image"])
    num = cfg.eval.num_samples
    matched = min(num, len(test_features))
    floor = features_frechet_distance(
        test_features[eval_run.subset(len(test_features), matched, cfg.seed)], train_features
    )
    key = jax.random.fold_in(jax.random.key(cfg.seed), eval_run.SAMPLE_KEY)
    teacher_params = run.frozen()["teacher"]

    def score(name, generate, params, s):
        images, labels, per_image = _timed_draw(generate, params, run, num, s, key)
        q = eval_run.quantize(images, cfg.data.num_levels)
        feats = clf.features(q)
        row = {
            "model": name,
            "sampler": s.sampler,
            "steps": int(s.num_steps),
            "fd": features_frechet_distance(feats, train_features),
            "fd_matched": features_frechet_distance(feats[:matched], train_features),
            "class_accuracy": None if labels is None else clf.accuracy(q, labels),
            "seconds_per_image": per_image,
            "images_per_second": 1.0 / per_image,
        }
        print(f"  {name:<8} {s.sampler:<5} {int(s.num_steps):>4} steps: FD {row['fd_matched']:.3f}")
        return row

    rows = []
    for k in steps:
        s = _sample_cfg(cfg, trained, cfg.sample.sampler, k)
        rows.append(score("student", run.method.make_sampler(run, s), trained.params, s))
    for k in (*steps, cfg.eval.teacher_steps):
        s = _sample_cfg(cfg, trained, "ddim", k)
        if teacher_guidance is not None:
            s.guidance_scale = float(teacher_guidance)
        rows.append(score("teacher", run.method.teacher_sampler(run, s), teacher_params, s))
    targets_fn = targets if targets_fn is None else targets_fn
    metrics = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "checkpoint_step": int(trained.step),
        "num_samples": num,
        "matched_size": matched,
        "guidance_scale": cfg.sample.guidance_scale,
        "teacher_guidance_scale": (
            cfg.sample.guidance_scale if teacher_guidance is None else float(teacher_guidance)
        ),
        "fd_heldout_matched": floor,
        "rows": rows + [dict(r) for r in extra_rows],
        "targets": targets_fn(rows, floor, cfg.eval.teacher_steps),
        "seconds": round(time.time() - t0, 1),
    }
    if jax.process_index() == 0:
        eval_run.write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
    return metrics


def _sample_cfg(cfg, trained, sampler: str, num_steps: int):
    s = cfg.sample.copy_and_resolve_references()
    s.sampler, s.num_steps, s.eta = sampler, int(num_steps), 0.0
    s.batch_size = methods.padded_batch_size(
        min(s.batch_size, cfg.eval.num_samples), trained.mesh.size
    )
    return s


def _row(rows, model, steps):
    return next((r for r in rows if r["model"] == model and r["steps"] == steps), None)


def targets(rows, floor: float, teacher_steps: int) -> dict:
    """The few-step targets, on the matched-size Fréchet distances: the 1-step student at least
    5x better than the teacher's 1-step DDIM; the 2- and 4-step students within 25% of the
    teacher at ``teacher_steps``, or no further above it than held-out real digits are above the
    training digits (``floor``), whichever allows more; the 4-step student at least 20x the
    images/s of the teacher at ``teacher_steps``."""
    out = {}
    ref = _row(rows, "teacher", teacher_steps)
    s1, t1 = _row(rows, "student", 1), _row(rows, "teacher", 1)
    if s1 and t1:
        out["one_step_5x_better"] = bool(5 * s1["fd_matched"] <= t1["fd_matched"])
    if ref:
        allowed = max(1.25 * ref["fd_matched"], ref["fd_matched"] + floor)
        out["allowed_fd"] = allowed
        for k in (2, 4):
            if _row(rows, "student", k):
                out[f"{k}_steps_near_teacher"] = bool(
                    _row(rows, "student", k)["fd_matched"] <= allowed
                )
        s4 = _row(rows, "student", 4)
        if s4:
            ratio = s4["images_per_second"] / ref["images_per_second"]
            out["speedup_4_steps"] = ratio
            out["4_steps_20x_faster"] = bool(ratio >= 20)
    return out


def format_report(d: dict) -> str:
    teacher_w = d.get("teacher_guidance_scale", d["guidance_scale"])
    lines = [
        f"{d['experiment']} at step {d['checkpoint_step']} on {d['dataset']}, guidance "
        f"{d['guidance_scale']} (teacher {teacher_w}); Fréchet distance to the train split on "
        f"{d['matched_size']} samples (held-out real digits: {d['fd_heldout_matched']:.3f})",
        f"  {'model':<8} {'sampler':<7} {'steps':>5}  {'FD':>8}  {'FD (all)':>8}  "
        f"{'class acc':>9}  {'ms/image':>9}  {'images/s':>9}",
    ]
    for r in d["rows"]:
        acc = "-" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}%"
        lines.append(
            f"  {r['model']:<8} {r['sampler']:<7} {r['steps']:>5}  {r['fd_matched']:>8.3f}  "
            f"{r['fd']:>8.3f}  {acc:>9}  {1000 * r['seconds_per_image']:>9.3f}  "
            f"{r['images_per_second']:>9.1f}"
        )
    t = d["targets"]
    if t:
        lines.append("  targets: " + ", ".join(f"{k} {_fmt(v)}" for k, v in t.items()))
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)
