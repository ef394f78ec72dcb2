"""Why was the textual-inversion demo weak? Train TI variants on the demo's concept and measure each.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python scripts/ti_strength_study.py --out /tmp/ti_study.jsonl \
        --variant baseline --variant templates ...

Same concept, data, prompts (2 x 4 seeds, Euler a, 20 steps, CFG 7) and measure as
``scripts/demo_user_training.py`` (huabi-mini image-tower cosine to the held-out concept
centroid, thumbnail RMS to the nearest held-out image); per variant also the final row norms
of the learned vectors (the vocabulary's mean norm for scale), the mean loss of the first and last
10 steps, and the training time. One JSON line per variant is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_user_training import TI_PROMPTS, concept_scores, generate, prepare_concept  # noqa: E402

BASE = dict(seed=7, init_word="pattern", num_vectors_per_token=2, learning_rate=5e-3, max_train_steps=100, class_tokens="zqxquilt")
VARIANTS = {
    "baseline": {},  # the demo's settings
    "templates": dict(use_object_template=True),
    "style_templates": dict(use_style_template=True),
    "templates_300": dict(use_object_template=True, max_train_steps=300),
    "templates_lr2e-2": dict(use_object_template=True, learning_rate=2e-2),
    "templates_lr1e-3": dict(use_object_template=True, learning_rate=1e-3),
    "templates_8vec": dict(use_object_template=True, num_vectors_per_token=8),
    "templates_init_quilt": dict(use_object_template=True, init_word="quilt"),
    "templates_random_init": dict(use_object_template=True, init_word=None),
    "templates_init_quilt_lr2e-3": dict(use_object_template=True, init_word="quilt", learning_rate=2e-3),
    "init_quilt": dict(init_word="quilt"),
    "templates_init_quilt_seed8": dict(use_object_template=True, init_word="quilt", seed=8),
    "baseline_seed8": dict(seed=8),
    "templates_lr1e-3_seed8": dict(use_object_template=True, learning_rate=1e-3, seed=8),
    "templates_lr1e-3_seed9": dict(use_object_template=True, learning_rate=1e-3, seed=9),
    "lr2e-2": dict(learning_rate=2e-2),
    "steps_300": dict(max_train_steps=300),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/huabi-ti-study"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--before", action="store_true", help="also measure the base model on the TI prompts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from huabi.train.user_config import UserTrainConfig
    from huabi.train.user_train import UserTrainer

    work = args.work
    model, _held_out, clip, reference = prepare_concept(work)
    if args.before:
        before = generate(model, TI_PROMPTS, work / "gen_before_ti")
        with args.out.open("a") as handle:
            handle.write(json.dumps({"variant": "before (base model)", "scores": concept_scores(clip, before, reference)}) + "\n")
    for name in args.variant:
        settings = {**BASE, **VARIANTS[name]}
        config = UserTrainConfig(mode="textual-inversion", output=str(work / name / "zqxquilt.safetensors"), token_string="zqxquilt",
                                 train_data_dir=str(work / "data"), resolution=128, min_bucket_reso=64, train_batch_size=4,
                                 caption_extension=".txt", save_precision="fp16", **settings)
        trainer = UserTrainer(config, log=lambda message: None, progress=False)
        started = time.monotonic()
        result = trainer.run()
        seconds = time.monotonic() - started
        embedding, rows = trainer.embedding_rows[0]
        vocabulary_norm = float(embedding.weight[: min(rows)].detach().norm(dim=1).mean())
        images = generate(model, TI_PROMPTS, work / name / "gen", embedding=result.output)
        record = {"variant": name, "settings": settings, "scores": concept_scores(clip, images, reference),
                  "vector_norms": [round(float(v), 3) for v in embedding.weight[rows].detach().norm(dim=1)],
                  "vocabulary_mean_norm": round(vocabulary_norm, 3),
                  "loss_first10": round(sum(result.losses[:10]) / 10, 4), "loss_last10": round(sum(result.losses[-10:]) / 10, 4),
                  "train_s": round(seconds, 1)}
        print(json.dumps(record), flush=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
