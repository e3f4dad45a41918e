"""Show a profile: a terminal table, and a PNG bar chart when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path

from edgeplug.atomic import atomic_file
from edgeplug.errors import EdgeplugError
from edgeplug.profiling import Profile
from edgeplug.terminal import escape

MIB = 2**20


def format_profile(profile: Profile, nodes: int = 10) -> str:
    s = profile.static
    lines = [
        f"profile of {escape(profile.artifact_dir)} at batch size {s.batch_size} ({s.optimizer})",
        "",
        "memory, counted                  MiB",
        f"  parameters               {s.parameter_bytes / MIB:10.3f}   (trainable {s.trainable_parameter_bytes / MIB:.3f})",
        f"  gradients                {s.gradient_bytes / MIB:10.3f}",
        f"  optimizer state          {s.optimizer_state_bytes / MIB:10.3f}",
        f"  retained activations     {s.retained_activation_bytes / MIB:10.3f}   ({len(s.retained)} tensors)",
        f"  total                    {s.total_training_bytes / MIB:10.3f}",
        "",
        "compute, counted               MMACs",
        f"  forward                  {s.forward_macs / 1e6:10.2f}",
        f"  backward                 {s.backward_macs / 1e6:10.2f}   ({s.backward_macs / s.forward_macs:.2f}x forward)" if s.forward_macs else
        f"  backward                 {s.backward_macs / 1e6:10.2f}",
    ]
    if s.unknown_shapes:
        lines.append(f"  not counted (shape unknown): {', '.join(escape(name) for name in s.unknown_shapes[:5])}")
    m = profile.measured
    if m is not None:
        lines += [
            "",
            f"measured, fresh process each, median of {m.steps} steps",
            f"  training step            {m.median_step_seconds * 1e3:10.2f} ms   peak RSS {m.train_peak_rss_bytes / MIB:8.1f} MiB",
            f"  inference                {m.median_inference_seconds * 1e3:10.2f} ms   peak RSS {m.inference_peak_rss_bytes / MIB:8.1f} MiB",
            f"  runtime alone                              peak RSS {m.baseline_rss_bytes / MIB:8.1f} MiB",
            f"  training overhead over inference: {m.training_overhead_bytes / MIB:+.1f} MiB peak, "
            f"{m.median_step_seconds / m.median_inference_seconds:.1f}x time" if m.median_inference_seconds else "",
        ]
    if nodes > 0:
        ranked = sorted(s.nodes, key=lambda n: (n.retained_bytes, n.forward_macs + n.backward_macs), reverse=True)[:nodes]
        lines += ["", f"top {len(ranked)} nodes by retained bytes, then MACs",
                  f"  {'node':<40} {'op':<24} {'retained KiB':>12} {'fwd MMACs':>10} {'bwd MMACs':>10}"]
        lines += [f"  {escape(n.name)[:40]:<40} {escape(n.op_type)[:24]:<24} {n.retained_bytes / 1024:12.1f} {n.forward_macs / 1e6:10.2f} {n.backward_macs / 1e6:10.2f}"
                  for n in ranked]
    return "\n".join(line for line in lines if line is not None)


def plot_profile(profile: Profile, target: Path) -> None:
    """Bar charts: memory by category (counted, and measured peaks) and MACs forward/backward."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeplugError("--plot needs matplotlib: pip install matplotlib (or the 'bench' extra)") from None
    s = profile.static
    panels = 3 if profile.measured else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    categories = ["parameters", "gradients", "optimizer", "activations"]
    values = [s.parameter_bytes, s.gradient_bytes, s.optimizer_state_bytes, s.retained_activation_bytes]
    axes[0].bar(categories, [v / MIB for v in values], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"])
    axes[0].set_title(f"counted memory, batch {s.batch_size}")
    axes[0].set_ylabel("MiB")
    axes[1].bar(["forward", "backward"], [s.forward_macs / 1e6, s.backward_macs / 1e6], color=["#4c72b0", "#c44e52"])
    axes[1].set_title("counted compute")
    axes[1].set_ylabel("MMACs")
    if profile.measured:
        m = profile.measured
        axes[2].bar(["runtime", "inference", "training"],
                    [m.baseline_rss_bytes / MIB, m.inference_peak_rss_bytes / MIB, m.train_peak_rss_bytes / MIB],
                    color=["#8c8c8c", "#4c72b0", "#c44e52"])
        axes[2].set_title("measured peak RSS")
        axes[2].set_ylabel("MiB")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    with atomic_file(Path(target)) as staging:
        figure.savefig(staging, format="png", dpi=120)
    plt.close(figure)
