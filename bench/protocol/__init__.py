"""The benchmark protocol every edgeplug comparison follows (see bench/README.md, "Protocol").

One module per rule, so that each workload (images, sensors, ...) applies the same rules:

- `episodes`: Meta-Dataset-style tasks: a domain and classes per episode, varying ways and
  shots, query disjoint from support, validation shots split from the support set, seeded.
- `lr_search`: each row's learning rate chosen per episode on the validation shots (never the
  query set), every candidate recorded.
- `stats`: paired differences over the same episodes with 95% intervals (t and bootstrap); no
  winner is named while the interval includes zero.
- `measure`: memory at the same point for every runtime (the ready point: model, sessions and
  data loaded, before step 1) and pinned, recorded thread counts.
- `isolation`: each (row, episode) in a fresh process, rows interleaved episode by episode.
- `report`: tables and plots that carry the intervals.

Nothing here imports torch or onnxruntime at import time: a child process pins threads first.
"""

from bench.protocol.episodes import Domain, Episode, EpisodeConfig, sample_episodes
from bench.protocol.isolation import interleaved, run_fresh
from bench.protocol.lr_search import Candidate, LrChoice, choose_lr, search_lr
from bench.protocol.measure import MemoryProbe, ThreadPinning, pin_threads
from bench.protocol.stats import (
    PairedDifference,
    paired_bootstrap,
    paired_t,
    verdict,
    winner,
)

__all__ = [
    "Candidate", "Domain", "Episode", "EpisodeConfig", "LrChoice", "MemoryProbe", "PairedDifference", "ThreadPinning",
    "choose_lr", "interleaved", "paired_bootstrap", "paired_t", "pin_threads", "run_fresh", "sample_episodes",
    "search_lr", "verdict", "winner",
]
