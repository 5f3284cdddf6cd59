"""`make eval` of an unCLIP prior run: how close the embeddings it samples for a caption naming
class c are to the CLIP image embeddings of real held-out digits of class c, written to
eval/metrics.json (atomically, once every number is computed).

For ``eval.num_samples`` prompts naming only a class (``captions.class_prompts``: "7", "seven",
"the digit 7", ... in turn, the classes in turn), one embedding ŝ is sampled per prompt (best
of prior.num_candidates, guided at prior.guidance_scale). With e_j the unit image embeddings of
the held-out digits:

- ``similarity_to_class``: mean over prompts of mean_{j of class c} cos(ŝ, e_j);
- ``random_pair_similarity``: mean cos(e_i, e_j) over all pairs i ≠ j of held-out digits, the
  similarity of two images picked at random: the baseline the prior must clearly beat;
- ``same_class_pair_similarity``: the same over pairs of one class, what a real digit of class c
  scores against the others (a prior that samples real-looking embeddings comes near it);
- ``text_embedding_similarity``: the prompt's own CLIP text embedding in place of ŝ (CLIP's
  text and image embeddings lie apart, the reason unCLIP learns a prior at all);
- ``class_agreement``: ŝ's zero-shot class (the nearest text embedding of the class prompts
  ``eval.zero_shot_prompt``) is c; ``nearest_image_agreement``: the nearest held-out image's
  class is c.

The same numbers without guidance (scale 1) are reported beside, as ``unguided_*``.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import conditions, contrastive, inference, methods
from diffusax.data import captions
from diffusax.evaluate.run import write_json
from diffusax.methods import prior
from diffusax.train.build import open_split

CHUNK = 250  # prompts per jitted sampling call (one compilation)
SAMPLE_STEP = 30_000_001  # folded into the seed's key for the eval's draws


def chunked(fn, arrays, size: int):
    """``fn(*chunk, i)`` over fixed-size chunks of ``arrays`` (the last padded by repeating its
    final row), numpy rows concatenated back to the arrays' length."""
    n, out = len(arrays[0]), []
    for i, start in enumerate(range(0, n, size)):
        parts = [a[start : start + size] for a in arrays]
        m = len(parts[0])
        padded = [np.concatenate([p, np.repeat(p[-1:], size - m, axis=0)]) for p in parts]
        out.append(np.asarray(fn(*padded, i))[:m])
    return np.concatenate(out)


def class_prompts(num: int, num_classes: int) -> tuple[list[str], np.ndarray]:
    """``num`` prompts naming the classes in turn, each class's phrasings in turn."""
    labels = np.arange(num) % num_classes
    prompts = []
    for i, c in enumerate(labels):
        options = captions.class_prompts(int(c))
        prompts.append(options[(i // num_classes) % len(options)])
    return prompts, labels


def similarities(sampled, image_emb, image_labels, prompt_labels, class_text) -> dict:
    """The similarity and agreement numbers of unit embeddings ``sampled`` (N, D) for prompts of
    ``prompt_labels`` against held-out ``image_emb`` (M, D) of ``image_labels``."""
    sims = sampled @ image_emb.T  # (N, M)
    same = prompt_labels[:, None] == image_labels[None, :]  # (N, M)
    to_class = np.sum(sims * same, 1) / np.sum(same, 1)  # (N,)
    to_other = np.sum(sims * ~same, 1) / np.sum(~same, 1)
    zero_shot = np.argmax(sampled @ class_text.T, axis=1)  # (N,)
    nearest = image_labels[np.argmax(sims, axis=1)]
    return {
        "similarity_to_class": float(np.mean(to_class)),
        "similarity_to_other_classes": float(np.mean(to_other)),
        "class_agreement": float(np.mean(zero_shot == prompt_labels)),
        "nearest_image_agreement": float(np.mean(nearest == prompt_labels)),
        "per_class_similarity": [
            float(np.mean(to_class[prompt_labels == c])) for c in range(len(class_text))
        ],
        "per_class_agreement": [
            float(np.mean(zero_shot[prompt_labels == c] == c)) for c in range(len(class_text))
        ],
    }


def pair_similarities(image_emb, labels) -> tuple[float, float]:
    """(mean cos over all pairs i ≠ j, the same over pairs of one class)."""
    sims = image_emb @ image_emb.T  # (M, M)
    off = ~np.eye(len(labels), dtype=bool)
    same = (labels[:, None] == labels[None, :]) & off
    return float(np.mean(sims[off])), float(np.mean(sims[same]))


def evaluate(cfg, workdir: str, *, devices=None) -> dict:
    """Score the latest checkpoint (the EMA) of the prior run in ``workdir``."""
    t0 = time.time()
    trained = inference.load_trained(cfg, workdir, devices=devices)
    params = {"clip": trained.run.frozen()["clip"], "prior": trained.params}
    metrics = score(cfg, trained.run, params, trained.step)
    metrics["seconds"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
    return metrics


def score(cfg, run, params, step: int) -> dict:
    """The metrics of the prior ``params["prior"]`` over the CLIP ``params["clip"]``, for a
    built ``run`` whose networks "clip" and "prior" they are (a prior run, or the unCLIP
    decoder's run, which holds both frozen)."""
    source = open_split(cfg, cfg.data.eval_split)
    held_out = source.read(np.arange(len(source)))
    images, labels = np.asarray(held_out["image"], np.float32), held_out["label"]

    @jax.jit
    def embed_images(clip_params, x):
        return prior.image_embeddings(run.ctx.module("clip", clip_params), x)

    @jax.jit
    def embed_texts(clip_params, tokens, mask):
        model = run.ctx.module("clip", clip_params)
        return contrastive.l2_normalize(model.encode_text(tokens, mask))

    clip_params = params["clip"]
    image_emb = chunked(lambda x, i: embed_images(clip_params, x), [images], CHUNK)  # (M, D)
    zero_shot = methods.get("clip").zero_shot_prompts(cfg)
    class_text = np.asarray(embed_texts(clip_params, *conditions.encode_prompts(cfg, zero_shot)))
    num_classes = len(zero_shot)
    prompts, prompt_labels = class_prompts(cfg.eval.num_samples, num_classes)
    tokens, mask = conditions.encode_prompts(cfg, prompts)
    rows = min(CHUNK, len(prompts))  # a few prompts (a test's) are not padded to CHUNK
    prompt_text = chunked(lambda t, m, i: embed_texts(clip_params, t, m), [tokens, mask], rows)

    key = jax.random.fold_in(jax.random.key(cfg.seed), SAMPLE_STEP)
    guided = prior.sampling_of(cfg)
    results = {}
    for name, settings in (("", guided), ("unguided_", guided._replace(guidance_scale=1.0))):
        if name and guided.guidance_scale == 1.0:
            break  # the guided numbers are the unguided ones
        fn = prior.make_sampler_fn(run, settings)
        draw = lambda t, m, i, fn=fn: fn(
            params, jnp.asarray(t), jnp.asarray(m), jax.random.fold_in(key, i)
        )
        sampled = chunked(draw, [tokens, mask], rows)  # (N, D) unit
        found = similarities(sampled, image_emb, labels, prompt_labels, class_text)
        results.update({name + k: v for k, v in found.items()})
    text_only = similarities(prompt_text, image_emb, labels, prompt_labels, class_text)
    random_pair, same_class_pair = pair_similarities(image_emb, labels)
    metrics = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "split": cfg.data.eval_split,
        "checkpoint_step": int(step),
        "num_heldout": len(images),
        "num_prompts": len(prompts),
        "example_prompts": prompts[:3],
        "sampler": f"{guided.sampler}, {guided.num_steps} steps",
        "guidance_scale": guided.guidance_scale,
        "num_candidates": guided.num_candidates,
        **results,
        "random_pair_similarity": random_pair,
        "same_class_pair_similarity": same_class_pair,
        "text_embedding_similarity": text_only["similarity_to_class"],
        "text_embedding_class_agreement": text_only["class_agreement"],
        "zero_shot_prompt": cfg.eval.zero_shot_prompt,
        "chance_agreement": 1.0 / num_classes,
    }
    return metrics


def format_report(d: dict) -> str:
    lines = [
        f"experiment {d['experiment']} (step {d['checkpoint_step']}), {d['num_prompts']} prompts "
        f"naming a class, {d['num_heldout']} held-out {d['dataset']} [{d['split']}]; "
        f"{d['sampler']}, guidance {d['guidance_scale']}, best of {d['num_candidates']}",
        f"cos(sampled embedding, held-out digits of the prompted class) "
        f"{d['similarity_to_class']:.4f} (other classes {d['similarity_to_other_classes']:.4f}); "
        f"random pairs of held-out digits {d['random_pair_similarity']:.4f}, pairs of one class "
        f"{d['same_class_pair_similarity']:.4f}, the prompt's text embedding "
        f"{d['text_embedding_similarity']:.4f}",
        f"class agreement (zero-shot class of the sampled embedding) {d['class_agreement']:.4f},"
        f" nearest held-out image {d['nearest_image_agreement']:.4f} (chance "
        f"{d['chance_agreement']:.2f})",
    ]
    if "unguided_similarity_to_class" in d:
        lines.append(
            f"unguided: cos {d['unguided_similarity_to_class']:.4f}, class agreement "
            f"{d['unguided_class_agreement']:.4f}, nearest image "
            f"{d['unguided_nearest_image_agreement']:.4f}"
        )
    return "\n".join(lines)
