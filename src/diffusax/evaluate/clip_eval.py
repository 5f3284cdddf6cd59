"""`make eval` of a CLIP run: zero-shot classification and caption-to-image retrieval on the
held-out digits, written to eval/metrics.json (atomically, once every number is computed).

Zero-shot classification (CLIP's protocol): each class c gets the prompt
``eval.zero_shot_prompt`` ("a photo of the digit {n}"); an image is given the class whose
prompt embedding has the largest cosine similarity with its own. The ensemble variant averages
the unit embeddings of several prompts per class (that one and ``captions.class_prompts``:
"7", "seven", "a seven", "the digit seven", ...) and renormalises, as the paper's prompt
ensembling does. Chance is 1 / 10.

Retrieval: every held-out image gets one caption drawn like the training captions (class,
and its own measured thickness and slant when the draw names them; a fixed draw), and each
caption ranks the whole held-out pool of images by cosine similarity. recall@k is the share of
captions whose own image is among the k best; chance at k = 1 is 1 / pool size. A caption that
names only the class cannot tell that class's 30 held-out images apart, so ``class_at_1``
(the best image has the caption's class) is reported beside it.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from diffusax import conditions, contrastive, inference
from diffusax.data import captions
from diffusax.data.captioned import CaptionedSource
from diffusax.evaluate.run import write_json
from diffusax.train.build import open_split

CAPTION_STEP = 20_000_023  # the "step" the held-out captions are drawn at (not a training one)
CHUNK = 512  # rows per jitted embedding call (one compilation)
RECALL_AT = (1, 5, 10)


def embedders(trained):
    """(images -> unit image embeddings, (tokens, mask) -> unit text embeddings), numpy in and
    out, in fixed-size padded chunks."""
    ctx = trained.run.ctx

    @jax.jit
    def image_fn(params, images):
        return contrastive.l2_normalize(ctx.module("clip", params).encode_image(images))

    @jax.jit
    def text_fn(params, tokens, mask):
        return contrastive.l2_normalize(ctx.module("clip", params).encode_text(tokens, mask))

    def chunked(fn, *arrays):
        out = []
        for start in range(0, len(arrays[0]), CHUNK):
            parts = [a[start : start + CHUNK] for a in arrays]
            n = len(parts[0])
            padded = [np.concatenate([p, np.repeat(p[-1:], CHUNK - n, axis=0)]) for p in parts]
            out.append(np.asarray(fn(trained.params, *padded))[:n])
        return np.concatenate(out)

    def embed_images(images):
        return chunked(image_fn, np.asarray(images, np.float32))

    def embed_texts(cfg, texts):
        tokens, mask = conditions.tokenizer_from_config(cfg).encode(
            list(texts), cfg.text.context_length, field="clip prompts"
        )
        return chunked(text_fn, tokens, mask)

    return embed_images, embed_texts


def zero_shot(image_emb, labels, class_emb) -> dict:
    """Accuracy of argmax_c cos(image, class c) over ``labels``, and per class."""
    predicted = np.argmax(image_emb @ class_emb.T, axis=1)  # (N,)
    right = predicted == labels
    per_class = [float(np.mean(right[labels == c])) for c in range(len(class_emb))]
    return {"accuracy": float(np.mean(right)), "per_class_accuracy": per_class}


def retrieval(text_emb, image_emb, labels) -> dict:
    """Caption i retrieves among all images; its own image is image i."""
    sims = text_emb @ image_emb.T  # (N captions, N images)
    own = np.diagonal(sims)[:, None]
    rank = np.sum(sims > own, axis=1)  # images scored above caption i's own: 0 = it came first
    best = np.argmax(sims, axis=1)
    out = {f"recall_at_{k}": float(np.mean(rank < k)) for k in RECALL_AT}
    out["class_at_1"] = float(np.mean(labels[best] == labels))
    out["median_rank"] = float(np.median(rank) + 1)  # 1 = first
    return out


def heldout_captions(cfg, source) -> list[str]:
    """One training-style caption per held-out example, from a fixed draw."""
    tok = conditions.tokenizer_from_config(cfg)
    captioned = CaptionedSource(source, tok, cfg.text.context_length)
    rows = np.arange(len(source))
    labels = source.read(rows)["label"]
    attrs = {k: v[rows] for k, v in captioned.attributes.items()}
    return captions.caption_rows(labels, attrs, cfg.seed, CAPTION_STEP, rows)


def evaluate(cfg, workdir: str, *, devices=None) -> dict:
    """Score the latest checkpoint of the CLIP run in ``workdir``."""
    t0 = time.time()
    trained = inference.load_trained(cfg, workdir, devices=devices)
    method = trained.run.method
    source = open_split(cfg, cfg.data.eval_split)
    held_out = source.read(np.arange(len(source)))
    images, labels = held_out["image"], held_out["label"]  # (N, H, W, C), (N,)
    embed_images, embed_texts = embedders(trained)
    image_emb = embed_images(images)  # (N, D), unit rows

    prompts = method.zero_shot_prompts(cfg)
    single = zero_shot(image_emb, labels, embed_texts(cfg, prompts))
    ensemble_prompts = [[prompts[c], *captions.class_prompts(c)] for c in range(len(prompts))]
    per_prompt = [embed_texts(cfg, p) for p in ensemble_prompts]  # 10 x (P, D)
    ensemble_emb = contrastive.l2_normalize(np.stack([e.mean(0) for e in per_prompt]))
    ensemble = zero_shot(image_emb, labels, np.asarray(ensemble_emb))

    texts = heldout_captions(cfg, source)
    found = retrieval(embed_texts(cfg, texts), image_emb, labels)
    t = float(jax.device_get(trained.params["logit_scale"]))
    metrics = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "split": cfg.data.eval_split,
        "checkpoint_step": int(trained.step),
        "num_heldout": len(images),
        "logit_scale": float(np.exp(min(t, cfg.clip.max_logit_scale))),
        "zero_shot_prompt": cfg.eval.zero_shot_prompt,
        "zero_shot_accuracy": single["accuracy"],
        "zero_shot_per_class": single["per_class_accuracy"],
        "zero_shot_ensemble_accuracy": ensemble["accuracy"],
        "zero_shot_ensemble_prompts": len(ensemble_prompts[0]),
        "zero_shot_chance": 1.0 / len(prompts),
        "retrieval_pool_size": len(images),
        **{f"retrieval_{k}": v for k, v in found.items()},
        "retrieval_chance_at_1": 1.0 / len(images),
        "retrieval_example_captions": texts[:5],
    }
    metrics["seconds"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
    return metrics


def format_report(d: dict) -> str:
    pool = d["retrieval_pool_size"]
    return "\n".join(
        [
            f"experiment {d['experiment']} (step {d['checkpoint_step']}), {d['num_heldout']} "
            f"held-out {d['dataset']} [{d['split']}], logit scale {d['logit_scale']:.2f}",
            f"zero-shot accuracy {d['zero_shot_accuracy']:.4f} with {d['zero_shot_prompt']!r}, "
            f"{d['zero_shot_ensemble_accuracy']:.4f} with {d['zero_shot_ensemble_prompts']} "
            f"prompts per class (chance {d['zero_shot_chance']:.2f})",
            f"caption -> image retrieval among {pool} held-out images: recall@1 "
            f"{d['retrieval_recall_at_1']:.4f} (chance {d['retrieval_chance_at_1']:.4f}), "
            f"@5 {d['retrieval_recall_at_5']:.4f}, @10 {d['retrieval_recall_at_10']:.4f}, "
            f"median rank {d['retrieval_median_rank']:g}; the best image has the caption's "
            f"class for {d['retrieval_class_at_1']:.4f}",
        ]
    )
