"""Proof that training learns: the demo trained on the real emoji, scored as it trains.

Runs every stage of `ldm demo` (its own run folder, `runs/bench/quality`) with the FID-style
evaluation (training/evaluation.py: Fréchet distance of EfficientNet-Lite0 features between
samples from held-out captions and held-out real images) every 250 steps, and sets two
references measured in the same run beside it: the same score for an untrained UNet's
samples (what learning must beat by far) and for real held-out images against each other
(the floor). Then a prompt check: for colour words the model can only learn from captions
(hearts, circles and squares in five colours), samples for colour A must be closer to the
real image of A than to the real image of every other colour B, scored for the trained and
the untrained model. That check asks a lot of the demo: each of those 15 captions names one
image. The demo's prompts name large groups instead (1,880 skin-tone variants), so a second
check does the same for skin tones: samples for "X, light skin tone" against the real light
and dark images of X, for ten subjects X. A third check asks whether captions steer the kind
of image: samples for captions of one kind (flags, yellow faces, clock faces, lettered
squares, keycaps) must be closer to the mean real image of that kind than to each other
kind's. The FID-style scores use every image of the held-out shard (101 generated against
101 real); last, how stable the score is: the final checkpoint scored under two sampling
seeds with 32 and with 101 generated images. `make bench-quality`; its last run took 32
minutes on 2 cores that a test suite shared for most of it.
"""

from __future__ import annotations

import itertools

import numpy as np

from bench.common import ROOT, WORK, decoded_samples, write_result

COLOURS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["heart", "circle", "square"]
SKIN_TONE_SUBJECTS = [
    "thumbs up sign", "thumbs down sign", "waving hand sign", "clapping hands sign",
    "ok hand sign", "raised fist", "flexed biceps", "baby", "boy", "girl",
]  # fmt: skip
TONES = ["light", "dark"]
SAMPLES_PER_PROMPT = 4


def _real_images(config, captions: set[str]) -> dict[str, np.ndarray]:
    """Caption -> the (first) real image with that caption, from the raw shards."""
    found: dict[str, np.ndarray] = {}
    for image, caption in decoded_samples(config.data.shards, config.data.resolution, captions):
        found.setdefault(caption, image)
    return found


def _small(images: np.ndarray) -> np.ndarray:
    """16x16 float pixels: distance in colour and coarse layout, not in fine detail."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return torch.nn.functional.adaptive_avg_pool2d(x, 16).flatten(1).numpy()


def colour_groups() -> list[list[str]]:
    """Prompt groups that differ only in colour: five colours of each shape."""
    return [[f"an emoji of {c} {shape}" for c in COLOURS] for shape in SHAPES]


def skin_tone_groups() -> list[list[str]]:
    """Prompt groups that differ only in skin tone: light and dark of each subject."""
    return [[f"an emoji of {x}, {t} skin tone" for t in TONES] for x in SKIN_TONE_SUBJECTS]


# Kinds of emoji that look alike within and unlike across, named by their captions (large
# groups: the demo sees each kind many times): flags, yellow faces, clock faces, the
# coloured letter squares, and keycaps.
CATEGORIES = {
    "flag": lambda c: c.startswith("an emoji of flag of "),
    "face": lambda c: c.endswith(" face") and not any(w in c for w in ("clock", "cat", "skin")),
    "clock": lambda c: "clock face" in c,
    "squared": lambda c: "squared" in c,
    "keycap": lambda c: c.startswith("an emoji of keycap"),
}
PROMPTS_PER_CATEGORY = 4


def category_check(sampler, unet, config, images: dict[str, list]) -> dict:
    """Samples for captions of kind A against the mean real image of each kind B: are they
    closer to A's? `images`: kind -> [(caption, image)], every real image of that kind."""
    s = config.sample
    kinds = list(images)
    means = np.stack([_small(np.stack([im for _, im in images[k]])).mean(0) for k in kinds])
    wins, pairs, margins = 0, 0, []
    for a, kind in enumerate(kinds):
        # Evenly spread captions of the kind, the same every run.
        members = sorted(c for c, _ in images[kind])
        step = max(1, len(members) // PROMPTS_PER_CATEGORY)
        prompts = members[::step][:PROMPTS_PER_CATEGORY]
        batch = [p for p in prompts for _ in range(SAMPLES_PER_PROMPT // 2)]
        generated = _small(sampler(unet, batch, s.seed, s.num_inference_steps, s.guidance_scale))
        distance = np.linalg.norm(generated[:, None] - means[None], axis=-1).mean(0)
        for b in range(len(kinds)):
            if b != a:
                pairs += 1
                wins += int(distance[a] < distance[b])
                margins.append(float(distance[b] - distance[a]))
    return {"pairs": pairs, "closer_to_own_colour": wins, "accuracy": wins / pairs,
            "mean_margin": float(np.mean(margins))}  # fmt: skip


def _category_images(config) -> dict[str, list]:
    found: dict[str, list] = {kind: [] for kind in CATEGORIES}
    for image, caption in decoded_samples(config.data.shards, config.data.resolution, None):
        for kind, matches in CATEGORIES.items():
            if matches(caption):
                found[kind].append((caption, image))
    return found


def prompt_check(sampler, unet, config, real: dict[str, np.ndarray], groups) -> dict:
    """For each group and pair (A, B) in it: are A's samples closer to real A than to real B?"""
    s = config.sample
    wins, pairs, margins = 0, 0, []
    for prompts in groups:
        batch = [p for p in prompts for _ in range(SAMPLES_PER_PROMPT)]
        generated = sampler(unet, batch, s.seed, s.num_inference_steps, s.guidance_scale)
        features = _small(generated).reshape(len(prompts), SAMPLES_PER_PROMPT, -1)
        targets = _small(np.stack([real[p] for p in prompts]))
        # distance[a, b]: mean distance of prompt a's samples to the real image of colour b
        distance = np.linalg.norm(features[:, :, None] - targets[None, None], axis=-1).mean(1)
        for a, b in itertools.permutations(range(len(prompts)), 2):
            pairs += 1
            wins += int(distance[a, a] < distance[a, b])
            margins.append(float(distance[a, b] - distance[a, a]))
    return {"pairs": pairs, "closer_to_own_colour": wins, "accuracy": wins / pairs,
            "mean_margin": float(np.mean(margins))}  # fmt: skip


# How many held-out images the stability check scores with (half generated, half real).
SPREAD_IMAGES = (64, 256)
SPREAD_SEEDS = (0, 1)


def score_spread(config, tag) -> dict:
    """The FID-style score of one checkpoint's EMA UNet under two sampling seeds, at each
    held-out image count in SPREAD_IMAGES: how far the score moves with the seed alone."""
    from core.layout import RunLayout
    from training.evaluation import Evaluator
    from training.sampling import Sampler, load_model

    trained = load_model(tag)
    sampler = Sampler(config, RunLayout.of(config).autoencoder_dir)
    spread: dict = {}
    for num_images in SPREAD_IMAGES:
        sized = config.model_copy(deep=True)
        sized.train.eval_num_images = num_images
        evaluator = Evaluator(sized)
        scores = {}
        for seed in SPREAD_SEEDS:
            sized.sample.seed = seed
            scores[f"seed_{seed}"] = evaluator.score(sampler, trained)["eval/fd_efficientnet_lite0"]
        values = list(scores.values())
        spread[str(evaluator.num_images)] = {
            **scores,
            "difference": abs(values[0] - values[1]),
            "real_vs_real": evaluator.reference,
        }
        print(
            f"  {evaluator.num_images} generated vs {evaluator.num_images} real images: "
            + ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
            + f" (real vs real {evaluator.reference:.1f})"
        )
    return spread


def main() -> dict:
    import mlflow
    import torch

    from core.layout import RunLayout
    from core.loader import load_config
    from models.unet import build_unet
    from orchestrator.demo import run_demo
    from training import checkpoint as ckpt
    from training.evaluation import Evaluator
    from training.sampling import Sampler, load_model

    root = WORK / "quality"
    # All 202 images of the held-out shard (the demo scores 64): 101 generated against 101
    # real, where 32 against 32 moves with the sampling seed (see score_spread).
    overrides = [f"run.root={root}", "train.eval_every=250", "train.eval_num_images=256"]
    timings = run_demo(ROOT / "configs" / "demo.yaml", overrides)
    config = load_config(ROOT / "configs" / "demo.yaml", overrides)

    layout = RunLayout.of(config)
    client = mlflow.MlflowClient(layout.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"attributes.run_name = '{config.run.name}' and tags.`ldm.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
    )
    history = client.get_metric_history(runs[0].info.run_id, "eval/fd_efficientnet_lite0")
    by_step = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}

    sampler = Sampler(config, layout.autoencoder_dir)
    evaluator = Evaluator(config)
    tag = ckpt.local_tag(ckpt.newest(layout.checkpoints), layout.checkpoints)
    trained = load_model(tag)
    torch.manual_seed(config.run.seed)
    untrained = build_unet(config, trained.config.in_channels).eval()
    untrained_fd = evaluator.score(sampler, untrained)["eval/fd_efficientnet_lite0"]
    final_fd = evaluator.score(sampler, trained)["eval/fd_efficientnet_lite0"]

    checks = {"colour": colour_groups(), "skin_tone": skin_tone_groups()}
    captions = {p for groups in checks.values() for group in groups for p in group}
    real = _real_images(config, captions)
    missing = captions - real.keys()
    assert not missing, f"no real image for {sorted(missing)}"
    prompt_checks = {
        name: {
            "trained": prompt_check(sampler, trained, config, real, groups),
            "untrained": prompt_check(sampler, untrained, config, real, groups),
        }
        for name, groups in checks.items()
    }
    by_kind = _category_images(config)
    prompt_checks["category"] = {
        "trained": category_check(sampler, trained, config, by_kind),
        "untrained": category_check(sampler, untrained, config, by_kind),
        "images_per_category": {k: len(v) for k, v in by_kind.items()},
    }

    print("\nFID-style score of the final checkpoint under two sampling seeds")
    spread = score_spread(config, tag)

    result = {
        "benchmark": "quality",
        "spread": spread,
        "fd_by_step": {str(k): v for k, v in sorted(by_step.items())},
        "fd_final_checkpoint": final_fd,
        "fd_untrained": untrained_fd,
        "fd_real_vs_real": evaluator.reference,
        "eval_images": evaluator.num_images,
        "prompt_checks": prompt_checks,
        "checkpoint": str(tag),
        "timings_s": timings,
    }
    print("\nFID-style score (EfficientNet-Lite0 features; lower is better)")
    print(f"  {'untrained UNet':28s} {untrained_fd:8.1f}")
    for step, value in sorted(by_step.items()):
        print(f"  {'trained, step ' + str(step):28s} {value:8.1f}")
    print(f"  {'real vs real (floor)':28s} {evaluator.reference:8.1f}")
    for name, what in (
        ("category", f"{len(CATEGORIES)} kinds of emoji ({', '.join(CATEGORIES)})"),
        ("skin_tone", f"skin tones of {len(SKIN_TONE_SUBJECTS)} subjects"),
        ("colour", f"5 colours of {', '.join(SHAPES)}, one image each"),
    ):
        trained_check, untrained_check = (prompt_checks[name][k] for k in ("trained", "untrained"))
        print(
            f"\nPrompt check, {what} ({trained_check['pairs']} ordered pairs): samples closer "
            f"to their own prompt's real image than to the other's in "
            f"{trained_check['accuracy']:.0%} of pairs (untrained UNet: "
            f"{untrained_check['accuracy']:.0%}; chance 50%)"
        )
    write_result("quality", result)
    return result


if __name__ == "__main__":
    main()
