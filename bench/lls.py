"""Benchmark of the `lls` pass: local learning with fixed-basis heads against backprop, from scratch.

Data: scikit-learn's digits (1797 images, 8x8 upscaled to SxS by nearest neighbour),
a fixed stratified 80/20 split. Model: a VGG-style CNN (conv-norm-ReLU x depth, pool,
conv-norm-ReLU x depth, pool, linear; `--no-norm` drops the per-sample norm, under which
LLS's last classifier fails: see docs/passes/lls.md) built and exported with torch here, then rewritten by edgeplug once
per row. Every row trains the same exported model with the same data order, optimizer,
learning rate, batch size and number of epochs, each in its own fresh process (whose
peak RSS is the row's training peak). Accuracy is that of the *exported* inference
model (`edgeplug export`) run in plain onnxruntime on the held-out images. Counted
costs come from `edgeplug.profiling.static_profile`, and a controlled measurement
(`edgeplug.profiling.measure`: baseline, inference and training, each in a fresh
process) at a larger batch, where activations rather than the runtime dominate memory.

    python bench/lls.py                      # ~15 min on 2 shared cores (20 epochs, 2 seeds)
    python bench/lls.py --quick              # smoke run
    python bench/lls.py --torch-check        # the same head in PyTorch: per-block accuracy and output scale
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROWS: dict[str, list[dict[str, Any]]] = {
    "backprop": [],
    "lls": [{"name": "lls"}],
    "lls-m": [{"name": "lls", "options": {"variant": "lls-m"}}],
    "lls-mxm": [{"name": "lls", "options": {"variant": "lls-mxm"}}],
    "random-basis": [{"name": "lls", "options": {"basis": "random"}}],
    "local-losses": [{"name": "lls", "options": {"variant": "local-classifier"}}],
}
MIB = 2**20


def vmhwm() -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def digits(image: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    factor = image // 8
    x = ((data.images.astype(np.float32) - 4.9) / 6.0).repeat(factor, axis=1).repeat(factor, axis=2)[:, None]  # ~ zero mean, unit std
    x_train, x_test, y_train, y_test = train_test_split(x, data.target.astype(np.int64), test_size=0.2,
                                                        random_state=0, stratify=data.target)
    return {"x": np.ascontiguousarray(x_train), "y": y_train}, {"x": np.ascontiguousarray(x_test), "y": y_test}


def hapt_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """UCI HAPT, UCI's own split: windows of the 21 training users to train, of the 9 others to test."""
    sys.path.insert(0, str(BENCH))
    import hapt
    import hapt_model

    windows = hapt.load()
    train, test = windows.select(users=hapt_model.SOURCE_USERS), windows.select(users=hapt_model.NEW_USERS)
    return {"x": train.x, "y": train.y}, {"x": test.x, "y": test.y}


def load_data(workload: str, image: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return hapt_data() if workload == "hapt" else digits(image)


def build_cnn(image: int, seed: int, width: int, depth: int, norm: bool) -> Any:
    """VGG-style CNN: `depth` conv(-norm)-ReLU of `width` channels, pool, `depth` of 2 x `width`, pool, linear.

    `norm` puts a per-sample normalisation (GroupNorm with one group, written with
    elementwise ops because onnxruntime-training has no InstanceNormalization
    gradient) between each conv and its ReLU, like the conv + BN + activation
    blocks of the LLS paper. BatchNorm itself cannot train from scratch here:
    onnxruntime-training normalises with batch statistics but never updates the
    running ones the exported model uses."""
    import torch
    from torch import nn

    class SampleNorm(nn.Module):
        """Normalise each sample over (C, H, W), then a per-channel scale and shift."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
            self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            centred = x - x.mean((1, 2, 3), keepdim=True)
            std = torch.sqrt((centred * centred).mean((1, 2, 3), keepdim=True) + 1e-5)
            return centred / std * self.scale + self.shift

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 1
    for stage_width in (width, 2 * width):
        for _ in range(depth):
            layers += [nn.Conv2d(channels, stage_width, 3, padding=1), *([SampleNorm(stage_width)] if norm else []), nn.ReLU()]
            channels = stage_width
        layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * (image // 4) ** 2, 10)).eval()
    for layer in model:  # He initialisation: a plain 2 x depth ReLU stack without it starts with vanishing signal
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


def export_cnn(path: Path, image: int, seed: int, width: int, depth: int, norm: bool) -> None:
    """`build_cnn`'s model exported in eval mode with a dynamic batch axis (opset 17)."""
    import torch

    model = build_cnn(image, seed, width, depth, norm)
    torch.onnx.export(model, (torch.zeros(1, 1, image, image),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)


def host() -> Any:
    import edgeplug
    import edgeplug_plugins.lls as lls

    plugin_host = edgeplug.PluginHost(only={"normalize"})
    plugin_host.register(lls, name="lls", version="bench")
    return plugin_host


def rewrite(model: Path, out: Path, passes: list[dict[str, Any]], lr: float) -> dict[str, Any]:
    import edgeplug
    from edgeplug.recipe import recipe_from_dict

    plugin_host = host()
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr, "schedule": {"name": "cosine"}},
                               "passes": passes}, host=plugin_host)
    return dict(edgeplug.rewrite(model, recipe, out, host=plugin_host, force=True).report)


# -- the training child: one row, one fresh process --------------------------------------------


def child(job: dict[str, Any]) -> dict[str, Any]:
    import edgeplug
    from edgeplug import _ort

    train, test = load_data(job.get("workload", "digits"), job["image"])
    # epoch-end checkpoints on: export reads the trained weights from the newest one
    trainer = edgeplug.Trainer(job["artifacts"], seed=job["seed"], progress=False, host=host())
    before = vmhwm()
    fit = trainer.fit(train, epochs=job["epochs"], batch_size=job["batch_size"], resume=False)
    peak = vmhwm()
    history = [{"epoch": e.epoch, "train_loss": e.train.loss, "train_accuracy": e.train.accuracy} for e in fit.epochs]
    exported = Path(job["artifacts"]) / "exported.onnx"
    edgeplug.export(job["artifacts"], exported)
    model = __import__("onnx").load(str(exported))
    if any(node.op_type == "BatchNormalization" for node in model.graph.node):
        # onnxruntime-training normalises with batch statistics and leaves the running ones as initialised:
        # every row's exported model gets its statistics re-estimated on the training data (precise BN)
        sys.path.insert(0, str(BENCH))
        import hapt_model

        model = hapt_model.precise_bn(model, train["x"])
    session = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"x": test["x"][i:i + 1024]})[0] for i in range(0, len(test["x"]), 1024)])
    return {"accuracy": float((logits.argmax(1) == test["y"]).mean()), "median_step_seconds": fit.median_step_seconds,
            "rss_before_training_bytes": before, "train_peak_rss_bytes": peak, "history": history,
            "exported_nodes": [node.op_type for node in __import__("onnx").load(str(exported)).graph.node]}


def run_child(job: dict[str, Any], work: Path) -> dict[str, Any]:
    path = work / f"job-{job['tag']}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"row {job['tag']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- counted costs -----------------------------------------------------------------------------


def counted(folder: Path, batch_size: int) -> dict[str, Any]:
    from edgeplug.profiling import static_profile

    profile = static_profile(folder, batch_size)
    head = [n for n in profile.nodes if "/lls" in n.name]
    return {
        "retained_activation_bytes": profile.retained_activation_bytes,
        "total_training_bytes": profile.total_training_bytes,
        "trainable_parameter_bytes": profile.trainable_parameter_bytes,
        "forward_macs": profile.forward_macs, "backward_macs": profile.backward_macs,
        "head_forward_macs": sum(n.forward_macs for n in head), "head_backward_macs": sum(n.backward_macs for n in head),
    }


# -- the PyTorch check: the paper's head on the same net, outside edgeplug ---------------------


def torch_check(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train `build_cnn`'s model with LLS in PyTorch (the reference's training loop) and by backprop.

    Same data, initial weights, optimizer (AdamW with onnxruntime-training's defaults: weight decay 0, eps 1e-6),
    cosine schedule, batch and epochs as the edgeplug rows. Reports, per block,
    the test accuracy of its own fixed head and the mean L2 norm of its output:
    where accuracy is lost, and what scale the last classifier sees."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    from edgeplug_plugins.lls.basis import basis

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    train, test = digits(args.image)
    x, y = torch.tensor(train["x"]), torch.tensor(train["y"])
    x_test, y_test = torch.tensor(test["x"]), torch.tensor(test["y"])
    pools = [4, 2]

    def split(model: nn.Sequential) -> list[nn.Sequential]:
        """Blocks as the pass cuts them: after each ReLU, moved past a pool that follows it."""
        layers, blocks, current = list(model), [], []
        for i, layer in enumerate(layers):
            current.append(layer)
            follows_pool = i + 1 < len(layers) and isinstance(layers[i + 1], nn.MaxPool2d)
            if (isinstance(layer, nn.ReLU) and not follows_pool) or isinstance(layer, nn.MaxPool2d):
                blocks.append(nn.Sequential(*current))
                current = []
        return [*blocks, nn.Sequential(*current)]

    def run_block(block: nn.Sequential, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the head reads, what the next block reads): the activation before a closing pool, as the
        reference code and the pass's default head_input: before-pool."""
        if isinstance(block[-1], nn.MaxPool2d):
            activation = block[:-1](h)
            return activation, block[-1](activation)
        out = block(h)
        return out, out

    def head(out: torch.Tensor, number: int) -> torch.Tensor:
        latent = F.normalize(F.adaptive_avg_pool2d(out, pools[min(number, 1)]).flatten(1), dim=1)
        return latent @ torch.tensor(basis("square", 10, latent.shape[1], seed=number)).T / 0.5

    result: dict[str, Any] = {}
    for mode in ("backprop", "lls"):
        blocks = split(build_cnn(args.image, seed, args.width, args.depth, args.norm).train())
        groups = [nn.ModuleList(blocks)] if mode == "backprop" else blocks
        optimizers = [torch.optim.AdamW(g.parameters(), lr=args.lr, weight_decay=0.0, eps=1e-6) for g in groups]
        steps = args.epochs * math.ceil(len(y) / args.batch_size)
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers]
        order = torch.Generator().manual_seed(seed)
        for _ in range(args.epochs):
            permutation = torch.randperm(len(y), generator=order)
            for start in range(0, len(y), args.batch_size):
                batch = permutation[start:start + args.batch_size]
                h, labels = x[batch], y[batch]
                if mode == "backprop":
                    for block in blocks:
                        h = block(h)
                    optimizers[0].zero_grad()
                    F.cross_entropy(h, labels).backward()
                    optimizers[0].step()
                else:
                    for number, (block, optimizer) in enumerate(zip(blocks, optimizers)):
                        seen, out = run_block(block, h.detach())
                        logits = out if number == len(blocks) - 1 else head(seen, number)
                        optimizer.zero_grad()
                        F.cross_entropy(logits, labels).backward()
                        optimizer.step()
                        h = out
                for schedule in schedules:
                    schedule.step()
        with torch.no_grad():
            h, heads, norms = x_test, [], []
            for number, block in enumerate(blocks[:-1]):
                seen, h = run_block(block.eval(), h)
                heads.append(float((head(seen, number).argmax(1) == y_test).float().mean()))
                norms.append(float(h.flatten(1).norm(dim=1).mean()))
            accuracy = float((blocks[-1](h).argmax(1) == y_test).float().mean())
        result[mode] = {"accuracy": accuracy, "head_accuracy": heads, "output_norm": norms}
    return result


def torch_check_markdown(args: argparse.Namespace, checks: list[dict[str, Any]], argv: list[str]) -> str:
    lines = [
        "# lls: PyTorch check of the paper's head on the bench's net (not edgeplug)",
        "",
        f"`python bench/lls.py {' '.join(argv)}`: {args.image}x{args.image} digits, the bench's CNN "
        f"(width {args.width}, depth {args.depth}, {'with' if args.norm else 'without'} per-sample norm), AdamW lr {args.lr} "
        f"cosine, batch {args.batch_size}, {args.epochs} epochs. Per block: test accuracy of its own square-basis head "
        "(head acc.) and mean L2 norm of its output on the test images (norm).",
        "",
        "| seed | backprop acc. | LLS acc. (last classifier) | LLS head acc., block 0..7 | LLS block output norm, block 0..7 | backprop output norm |",
        "|---|---|---|---|---|---|",
    ]
    for seed, check in enumerate(checks):
        b, s = check["backprop"], check["lls"]
        lines.append(f"| {seed} | {b['accuracy']:.3f} | {s['accuracy']:.3f} | {' '.join(f'{a:.2f}' for a in s['head_accuracy'])} | "
                     f"{' '.join(f'{n:.1f}' for n in s['output_norm'])} | {' '.join(f'{n:.1f}' for n in b['output_norm'])} |")
    return "\n".join(lines) + "\n"


# -- report ------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    base = result["rows"]["backprop"]
    if s.get("workload") == "hapt":
        setting = [
            "# lls: local learning with fixed-basis heads vs backprop (UCI HAPT, from scratch)", "",
            f"`python bench/lls.py{result['command_args']}`: UCI HAPT 2.56 s x 6-channel windows, UCI's split: "
            f"{s['train']} windows of the 21 training users / {s['test']} of the 9 test users; the HAPT 1D-CNN "
            f"(bench/hapt_model.py: 3 x [Conv1d k5 {s['width']}/{2 * s['width']}/{2 * s['width']} + BatchNorm + ReLU + MaxPool 2], "
            f"GAP, linear: 4 LLS blocks, heads on the activation before the pool), AdamW lr {s['lr']} cosine, batch "
            f"{s['batch_size']}, {s['epochs']} epochs, seeds {s['seeds']}. BatchNorm trains with batch statistics; every row's "
            "exported model gets its running statistics re-estimated on the training windows (precise BN). "
            "Accuracy: that model in plain onnxruntime on the test users' windows (mean over seeds). "]
    else:
        setting = [
            "# lls: local learning with fixed-basis heads vs backprop (digits, from scratch)", "",
            f"`python bench/lls.py{result['command_args']}`: {s['image']}x{s['image']} digits ({s['train']} train / {s['test']} test), "
            f"VGG-style CNN ({s['depth']} x conv{s['width']}{'-norm' if s.get('norm') else ''}-ReLU, pool, {s['depth']} x conv{2 * s['width']}{'-norm' if s.get('norm') else ''}-ReLU, pool, linear: {2 * s['depth'] + 1} LLS blocks), AdamW lr {s['lr']} cosine, batch {s['batch_size']}, {s['epochs']} epochs, "
            f"seeds {s['seeds']}. Accuracy: the exported inference model in plain onnxruntime on the test images (mean over seeds). "]
    lines = [
        *setting[:-1],
        setting[-1] +
        f"Training peak: VmHWM of the training process at batch {s['batch_size']}. Controlled: `edgeplug.profiling.measure` at batch "
        f"{s['measure_batch']} (fresh processes; overhead = training peak minus the runtime alone). 2 shared CPU cores: times are "
        "noisy, compare ratios from this one run.",
        "",
        f"| row | accuracy | Δ vs backprop (pts) | train peak RSS MiB (b{s['batch_size']}) | peak RSS MiB (b{s['measure_batch']}) | "
        f"ratio vs backprop | overhead MiB (b{s['measure_batch']}) | ratio | retained act. MiB (b{s['measure_batch']}) | "
        f"fwd+bwd MMACs/step (b{s['batch_size']}) | head fwd+bwd MMACs | median step ms (b{s['batch_size']}) | step ms (b{s['measure_batch']}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        m, bm = row["measured"], base["measured"]
        lines.append(
            f"| {name} | {row['accuracy']:.3f} ± {row['accuracy_std']:.3f} | {100 * (row['accuracy'] - base['accuracy']):+.1f} | "
            f"{row['train_peak_rss_bytes'] / MIB:.0f} | {m['train_peak_rss_bytes'] / MIB:.0f} | "
            f"{bm['train_peak_rss_bytes'] / m['train_peak_rss_bytes']:.2f}x | {m['overhead_bytes'] / MIB:.0f} | "
            f"{bm['overhead_bytes'] / max(m['overhead_bytes'], 1):.2f}x | {row['counted_big']['retained_activation_bytes'] / MIB:.1f} | "
            f"{(row['counted']['forward_macs'] + row['counted']['backward_macs']) / 1e6:.0f} | "
            f"{(row['counted']['head_forward_macs'] + row['counted']['head_backward_macs']) / 1e6:.2f} | "
            f"{1e3 * row['median_step_seconds']:.1f} | {1e3 * m['median_step_seconds']:.0f} |")
    lines += ["", "Ratios divide backprop's value by the row's (higher = the row needs less).", ""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(BENCH))
    from plotting import accuracy_axis, label_points

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    points: list[list[tuple[float, float, str]]] = [[], []]
    for name, row in rows.items():
        m = row["measured"]
        macs = (row["counted"]["forward_macs"] + row["counted"]["backward_macs"]) / 1e6
        for axis, found, x in zip(axes, points, (m["train_peak_rss_bytes"] / MIB, macs), strict=True):
            axis.errorbar(x, row["accuracy"], yerr=row["accuracy_std"], fmt="o", capsize=3)
            found.append((x, row["accuracy"], name))
    for axis, found in zip(axes, points, strict=True):
        accuracy_axis(axis, [row["accuracy"] + sign * row["accuracy_std"] for row in rows.values() for sign in (-1, 1)])
        label_points(axis, found)
    s = result["settings"]
    axes[0].set_xlabel(f"peak training RSS (MiB), batch {s['measure_batch']}, measured")
    axes[1].set_xlabel(f"forward+backward MMACs per step, batch {s['batch_size']}, counted")
    for axis in axes:
        axis.set_ylabel("test accuracy (exported model)")
        axis.grid(alpha=0.3)
    what = "UCI HAPT 1D-CNN" if s.get("workload") == "hapt" else f"digits {s['image']}x{s['image']}"
    fig.suptitle(f"lls vs backprop: {what}, {s['epochs']} epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=["digits", "hapt"], default="digits",
                        help="hapt: UCI HAPT windows, the HAPT 1D-CNN (bench/hapt_model.py; --width sets its channels), "
                        "UCI's train/test users")
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolutions (then twice that)")
    parser.add_argument("--depth", type=int, default=4, help="conv-ReLU layers per resolution")
    parser.add_argument("--norm", action=argparse.BooleanOptionalAction, default=True,
                        help="per-sample normalisation between each conv and its ReLU (--no-norm: plain conv-ReLU)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--measure-batch", type=int, default=4096)
    parser.add_argument("--measure-steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated rows")
    parser.add_argument("--torch-check", action="store_true",
                        help="instead of the edgeplug rows: the LLS head and backprop in PyTorch on the same net, per-block accuracy and scale")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, measure batch 256")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-lls"))
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--tag", default="", help="result files lls.<tag>.md/.json/.png instead of lls.md/...")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text(encoding="utf-8")))))
        return 0
    if args.torch_check:
        checks = [torch_check(args, seed) for seed in range(args.seeds)]
        name = f"lls.torch-check-{'norm' if args.norm else 'plain'}" + (f"-{args.tag}" if args.tag else "")
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{name}.json").write_text(json.dumps(checks, indent=1) + "\n", encoding="utf-8")
        (args.results / f"{name}.md").write_text(torch_check_markdown(args, checks, argv), encoding="utf-8")
        print(torch_check_markdown(args, checks, argv))
        return 0
    if args.quick:
        args.seeds, args.epochs, args.measure_batch, args.measure_steps = 1, 2, 256, 2
    from edgeplug.profiling import measure

    args.work.mkdir(parents=True, exist_ok=True)
    train, test = load_data(args.workload, args.image)
    names = args.only.split(",") if args.only else list(ROWS)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = []
        for seed in range(args.seeds):
            if args.workload == "hapt":
                model = args.work / f"hapt-cnn-{args.width}-{seed}.onnx"
                if not model.exists():
                    sys.path.insert(0, str(BENCH))
                    import hapt_model

                    __import__("onnx").save(hapt_model.build_cnn(args.width, seed=seed), str(model))
            else:
                model = args.work / f"cnn-{args.image}-{args.width}-{args.depth}-{'norm' if args.norm else 'plain'}-{seed}.onnx"
                if not model.exists():
                    export_cnn(model, args.image, seed, args.width, args.depth, args.norm)
            folder = args.work / f"{name}-{seed}"
            report = rewrite(model, folder, ROWS[name], args.lr)
            run = run_child({"tag": f"{name}-{seed}", "artifacts": str(folder), "image": args.image, "seed": seed,
                             "workload": args.workload,
                             "epochs": args.epochs, "batch_size": args.batch_size}, args.work)
            run["stages"] = len(report.get("stages", [])) or 1
            runs.append(run)
            print(f"{name} seed {seed}: accuracy {run['accuracy']:.3f}, train peak {run['train_peak_rss_bytes'] / MIB:.0f} MiB, "
                  f"median step {1e3 * run['median_step_seconds']:.1f} ms", flush=True)
        folder = args.work / f"{name}-0"
        measured = measure(folder, args.measure_batch, args.measure_steps, 1)
        accuracies = [run["accuracy"] for run in runs]
        rows[name] = {
            "accuracy": statistics.mean(accuracies), "accuracy_std": statistics.pstdev(accuracies), "accuracies": accuracies,
            "train_peak_rss_bytes": statistics.median(run["train_peak_rss_bytes"] for run in runs),
            "median_step_seconds": statistics.median(run["median_step_seconds"] for run in runs),
            "stages": runs[0]["stages"], "runs": runs,
            "measured": {**measured.to_dict(), "overhead_bytes": measured.train_peak_rss_bytes - measured.baseline_rss_bytes},
            "counted": counted(folder, args.batch_size), "counted_big": counted(folder, args.measure_batch),
        }
        print(f"{name}: measured at batch {args.measure_batch}: peak {measured.train_peak_rss_bytes / MIB:.0f} MiB, "
              f"step {1e3 * measured.median_step_seconds:.0f} ms", flush=True)
    notes = []
    if "backprop" in rows:
        base = rows["backprop"]
        for name in ("lls", "lls-m", "lls-mxm"):
            if name in rows:
                gap = 100 * (base["accuracy"] - rows[name]["accuracy"])
                memory = base["measured"]["train_peak_rss_bytes"] / rows[name]["measured"]["train_peak_rss_bytes"]
                notes.append(f"{name}: {gap:.1f} points below backprop (target <= 3: {'met' if gap <= 3 else 'NOT met'}); peak training RSS "
                             f"{memory:.2f}x lower at batch {args.measure_batch} (target >= 2x: {'met' if memory >= 2 else 'NOT met'})")
    if "lls" in rows and "local-losses" in rows:
        a, b = rows["lls"]["counted"], rows["local-losses"]["counted"]
        notes.append(f"MACs per step (batch {args.batch_size}), lls vs local-losses: whole step {(a['forward_macs'] + a['backward_macs']) / 1e6:.0f} vs "
                     f"{(b['forward_macs'] + b['backward_macs']) / 1e6:.0f} MMACs; heads alone {(a['head_forward_macs'] + a['head_backward_macs']) / 1e6:.2f} vs "
                     f"{(b['head_forward_macs'] + b['head_backward_macs']) / 1e6:.2f} MMACs (the fixed head needs no weight gradient; with the square basis "
                     "its projection is additions and subtractions only, counted here as MACs)")
    command_args = "" if not argv else " " + " ".join(argv)
    result = {
        "settings": {"workload": args.workload, "image": args.image, "width": args.width, "depth": args.depth, "norm": args.norm, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
                     "measure_batch": args.measure_batch, "measure_steps": args.measure_steps,
                     "train": int(len(train["y"])), "test": int(len(test["y"]))},
        "command_args": command_args, "rows": rows, "notes": notes,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"lls.{args.tag}" if args.tag else "lls"
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.results / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    plot(result, args.results / f"{stem}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
