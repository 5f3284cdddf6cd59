"""Does a text-conditional model draw the attribute its prompt asks for?

For each attribute of the digit captions (``data.captions``: thickness, slant) and each of its
named buckets (-1: "thin" / "leaning left", +1: "thick" / "leaning right"), the model is
prompted ``eval.attribute_per_class`` times per class with prompts naming the class and that bucket
("a thick 7", "a 7 leaning left", phrasings in turn). Each sample is brought to the data's size
and measured exactly as the captions were made (``captions.measure``, bucketed by the train
split's per-class terciles). Agreement is the share measured in the bucket asked for; chance is
that bucket's share in the training data (about 1/3 by construction), and ``opposite`` the
share measured in the opposite bucket.
"""

from __future__ import annotations

import jax
import numpy as np

from diffusax import methods
from diffusax.data import captioned, captions
from diffusax.evaluate.reconstruction import to_data_size

BATCH = 200  # samples per sampling call, at most


def attribute_agreement(trained, clf, data_shape, key) -> dict:
    """{"rows": [{attribute, asked, agreement, chance, opposite, class_accuracy, ...}]}."""
    from diffusax.conditions import encode_prompts

    run, cfg = trained.run, trained.cfg
    per_class = cfg.eval.attribute_per_class
    classes = run.data.dataset_classes
    s = cfg.sample.copy_and_resolve_references()
    with s.unlocked():
        s.batch_size = methods.padded_batch_size(min(BATCH, classes * per_class), trained.mesh.size)
    generate = run.method.make_sampler(run, s)
    thresholds = captioned.digits_thresholds()
    train_buckets = captioned.attribute_buckets(captioned.digits("train"), thresholds)
    rows = []
    for a, attribute in enumerate(captions.ATTRIBUTES):
        for asked in (-1, 1):
            labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
            prompts = []
            for i, label in enumerate(labels):
                options = captions.attribute_prompts(int(label), attribute, asked)
                prompts.append(options[(i % per_class) % len(options)])
            tokens, mask = encode_prompts(cfg, prompts)
            images, _ = methods.generate_many(
                generate,
                trained.params,
                len(labels),
                s.batch_size,
                None,
                jax.random.fold_in(key, 2 * a + (asked > 0)),
                conditions={"tokens": tokens, "mask": mask},
            )
            small = to_data_size(images, data_shape)  # (N, h, w, C) in [-1, 1]
            measured = captions.buckets(captions.measure(small), labels, thresholds)[attribute]
            rows.append(
                {
                    "attribute": attribute,
                    "asked": asked,
                    "example_prompt": prompts[7 * per_class],
                    "num_samples": len(labels),
                    "agreement": float(np.mean(measured == asked)),
                    "opposite": float(np.mean(measured == -asked)),
                    "chance": float(np.mean(train_buckets[attribute] == asked)),
                    "class_accuracy": clf.accuracy(small, labels),
                }
            )
    return {"rows": rows, "per_class": per_class}
