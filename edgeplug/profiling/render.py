"""Show a profile: a terminal table, and a PNG bar chart when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeplug.atomic import atomic_file
from edgeplug.errors import EdgeplugError
from edgeplug.profiling import Profile
from edgeplug.terminal import escape

MIB = 2**20


def format_profile(profile: Profile, nodes: int = 10) -> str:
    s = profile.static
    lines = [
        f"profile of {escape(profile.artifact_dir)} at batch size {s.batch_size}"
        + "".join(f", {escape(name)} {length}" for name, length in s.dims.items()) + f" ({s.optimizer})",
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
        timed = {entry["name"]: entry for entry in (m.nodes if m is not None else ())}
        if timed:
            ranked = sorted(s.nodes, key=lambda n: _seconds(timed.get(n.name)), reverse=True)[:nodes]
            order = "measured time (onnxruntime's profiler, median per step)"
        else:
            ranked = sorted(s.nodes, key=lambda n: (n.retained_bytes, n.forward_macs + n.backward_macs), reverse=True)[:nodes]
            order = "retained bytes, then MACs"
        lines += ["", f"top {len(ranked)} nodes by {order}",
                  f"  {'node':<40} {'op':<20} {'retained KiB':>12} {'fwd MMACs':>10} {'bwd MMACs':>10}"
                  + (f" {'fwd ms':>8} {'bwd ms':>8}" if timed else "")]
        for n in ranked:
            row = (f"  {escape(n.name)[:40]:<40} {escape(n.op_type)[:20]:<20} {n.retained_bytes / 1024:12.1f} {n.forward_macs / 1e6:10.2f} "
                   f"{n.backward_macs / 1e6:10.2f}")
            if timed:
                entry = timed.get(n.name)
                row += f" {entry['forward_seconds'] * 1e3:8.3f} {entry['backward_seconds'] * 1e3:8.3f}" if entry else f" {'-':>8} {'-':>8}"
            lines.append(row)
        if m is not None and m.other_kernels:
            shown = ", ".join(f"{escape(k['name'])[:40]} {k['seconds'] * 1e3:.3f} ms" for k in m.other_kernels[:3])
            lines.append(f"  other kernels: {shown}" + (f" (+{len(m.other_kernels) - 3} more)" if len(m.other_kernels) > 3 else ""))
        if m is not None and m.kernels_note:
            lines.append(f"  per-node times not measured: {m.kernels_note}")
    return "\n".join(line for line in lines if line is not None)


def _seconds(entry: dict[str, Any] | None) -> float:
    return float(entry["forward_seconds"] + entry["backward_seconds"]) if entry else -1.0


def plot_profile(profile: Profile, target: Path, nodes: int = 15) -> None:
    """Top row: memory by category (counted; measured peaks) and MACs forward/backward. Bottom: the `nodes` costliest
    layers, measured forward/backward time (onnxruntime's profiler) beside counted MACs and retained bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeplugError("--plot needs matplotlib: pip install 'edgeplug[plot]'") from None
    s = profile.static
    m = profile.measured
    panels = 3 if m else 2
    timed = {entry["name"]: entry for entry in (m.nodes if m is not None else ())}
    ranked = sorted(s.nodes, key=lambda n: (_seconds(timed.get(n.name)), n.forward_macs + n.backward_macs), reverse=True)[:nodes]
    figure = plt.figure(figsize=(4.2 * panels, 3.6 + (0.32 * len(ranked) + 1.2 if ranked else 0)))
    grid = figure.add_gridspec(2 if ranked else 1, panels, height_ratios=[3.6, 0.32 * len(ranked) + 1.2] if ranked else None)
    axes = [figure.add_subplot(grid[0, column]) for column in range(panels)]
    categories = ["parameters", "gradients", "optimizer", "activations"]
    values = [s.parameter_bytes, s.gradient_bytes, s.optimizer_state_bytes, s.retained_activation_bytes]
    axes[0].bar(categories, [v / MIB for v in values], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"])
    axes[0].set_title(f"counted memory, batch {s.batch_size}")
    axes[0].set_ylabel("MiB")
    axes[1].bar(["forward", "backward"], [s.forward_macs / 1e6, s.backward_macs / 1e6], color=["#4c72b0", "#c44e52"])
    axes[1].set_title("counted compute")
    axes[1].set_ylabel("MMACs")
    if m:
        axes[2].bar(["runtime", "inference", "training"],
                    [m.baseline_rss_bytes / MIB, m.inference_peak_rss_bytes / MIB, m.train_peak_rss_bytes / MIB],
                    color=["#8c8c8c", "#4c72b0", "#c44e52"])
        axes[2].set_title("measured peak RSS")
        axes[2].set_ylabel("MiB")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=20)
    if ranked:
        labels = [f"{n.name[:32]} ({n.op_type})" for n in ranked][::-1]
        positions = list(range(len(ranked)))
        left = figure.add_subplot(grid[1, : panels - 1] if panels > 2 else grid[1, 0])
        if timed:
            forward = [timed[n.name]["forward_seconds"] * 1e3 if n.name in timed else 0.0 for n in ranked][::-1]
            backward = [timed[n.name]["backward_seconds"] * 1e3 if n.name in timed else 0.0 for n in ranked][::-1]
            left.barh(positions, forward, color="#4c72b0", label="forward")
            left.barh(positions, backward, left=forward, color="#c44e52", label="backward")
            left.set_xlabel("measured ms per step (onnxruntime profiler, median)")
            left.set_title(f"the {len(ranked)} slowest layers")
        else:
            left.barh(positions, [n.forward_macs / 1e6 for n in ranked][::-1], color="#4c72b0", label="forward")
            left.barh(positions, [n.backward_macs / 1e6 for n in ranked][::-1], left=[n.forward_macs / 1e6 for n in ranked][::-1],
                      color="#c44e52", label="backward")
            left.set_xlabel("counted MMACs (not measured: --static-only)")
            left.set_title(f"the {len(ranked)} costliest layers")
        left.set_yticks(positions, labels, fontsize=7)
        left.legend(loc="lower right", fontsize=7)
        right = figure.add_subplot(grid[1, panels - 1], sharey=left)
        right.barh(positions, [(n.forward_macs + n.backward_macs) / 1e6 for n in ranked][::-1], color="#8c8c8c")
        right.set_xlabel("counted MMACs (forward + backward)")
        right.tick_params(axis="y", labelleft=False)
        twin = right.twiny()
        twin.plot([n.retained_bytes / 1024 for n in ranked][::-1], positions, "o", color="#dd8452", markersize=4)
        twin.set_xlabel("retained KiB (dots)", color="#dd8452")
    figure.tight_layout()
    with atomic_file(Path(target)) as staging:
        figure.savefig(staging, format="png", dpi=120)
    plt.close(figure)
