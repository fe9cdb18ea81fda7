"""Training-step overhead: a hand-written PyTorch loop vs blendtune's loop with each strategy (an epoch:
its start hook, e.g. PMR's prototype pass, and its steps).

    python benchmarks/step_overhead.py --model avdigits --batch 64 --steps 40
    python benchmarks/step_overhead.py --model resnet18 --batch 8 --steps 4 --repeats 3
    python benchmarks/step_overhead.py --model resnet18 --device cuda --amp bf16 --batch 64 256   (GPU)

Same model (encoders and concat fusion built by the same builders), same in-memory data, same
optimizer, same precision. The bare loop shuffles, indexes a batch, runs forward / cross-entropy /
backward / step. `--baseline best` (the default) makes it a best-practice loop: channels_last model and
batches, and on CUDA cudnn.benchmark and a fused optimizer (`--compile` adds torch.compile to it);
blendtune runs with its defaults for the device (channels_last; on CUDA data on the device and a fused
optimizer). `--baseline plain` runs both loops NCHW. Both loops always share the memory layout: the
table measures blendtune's overhead, not a layout.
On CUDA the table adds MFU from `--gflop-per-sample` (ResNet-18 pair: 21.3) and `--peak-tflops`. blendtune runs `Trainer.train_epoch`: its hooks, its uni-modal probe heads, its
sampler. One epoch of each per round, alternated over rounds (after a warm-up round); medians.
Writes benchmarks/results/step_overhead_<model>_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, median, timed, write  # noqa: E402

from blendtune.config import load_config  # noqa: E402
from blendtune.data import DATASETS, DatasetAdapter, MultimodalDataset  # noqa: E402
from blendtune.data.base import held_out_indices  # noqa: E402
from blendtune.models import build_encoder  # noqa: E402
from blendtune.optim import build_optimizer  # noqa: E402
from blendtune.build import build_trainer  # noqa: E402

MODELS = {  # input shapes, encoder, encoder options, optimizer overrides
    # the AV-digits experiments' model: log-mel 1x40x101 and MNIST 1x28x28, small CNNs, Adam
    "avdigits": ({"audio": (1, 40, 101), "image": (1, 28, 28)}, "spec_cnn", {"dim": 64, "hidden": 16},
                 ["optim.name=adam", "optim.lr=0.001"]),
    # OGM-GE's CREMA-D model: ResNet-18 on the 1x257x188 spectrogram and on a 3x224x224 frame, SGD
    "resnet18": ({"audio": (1, 257, 188), "visual": (1, 3, 224, 224)}, "resnet18", {"dim": 512, "hidden": 0},
                 ["optim.name=sgd", "optim.lr=0.001", "optim.momentum=0.9"]),
}
NUM_CLASSES = 10


class BenchTensors(DatasetAdapter):
    """Random tensors at the model's shapes, already in memory."""
    name = "bench_tensors"
    shapes: dict = {}
    size = 0

    def build(self, skip_bad=False, spectrogram_on="loader", **_loader_options):
        targets = bench_targets(self.size)
        gen = torch.Generator().manual_seed(1)
        inputs = {m: torch.randn(self.size, *s, generator=gen) for m, s in self.shapes.items()}
        ds = MultimodalDataset(inputs, targets, NUM_CLASSES)
        return ds, ds.subset(range(NUM_CLASSES))


DATASETS.register(BenchTensors.name)(BenchTensors)


def bench_targets(size: int) -> torch.Tensor:
    return torch.randint(NUM_CLASSES, (size,), generator=torch.Generator().manual_seed(0))


def size_with_held_out(train_size: int, ratio: float) -> int:
    """The dataset size whose stratified held-out split leaves exactly `train_size` training samples."""
    for size in range(train_size, 2 * train_size):
        if len(held_out_indices(bench_targets(size).numpy(), ratio, seed=0)[0]) == train_size:
            return size
    raise ValueError(f"no dataset size leaves {train_size} training samples")


class BareModel(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fc = nn.Linear(sum(e.out_dim for e in encoders.values()), NUM_CLASSES)

    def forward(self, inputs):
        return self.fc(torch.cat([self.encoders[m](inputs[m]) for m in self.encoders], dim=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="avdigits")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["naive", "ogm", "ogm_ge", "gblend", "mmpareto", "pmr", "mla", "agm",
                                                          "ume", "umt"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--baseline", choices=["plain", "best"], default="best",
                        help="plain: both loops NCHW, foreach optimizer; best: both channels_last, and on CUDA "
                             "cudnn.benchmark and a fused optimizer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the baseline (and blendtune: train.compile)")
    parser.add_argument("--gflop-per-sample", type=float, default=None, help="for MFU (ResNet-18 pair: 21.3)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100 bf16: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    best = args.baseline == "best"
    if best and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    shapes, encoder, enc_opts, optim = MODELS[args.model]
    BenchTensors.shapes = shapes
    mfu = args.gflop_per_sample is not None
    table = ["| batch | loop | steps/s | samples/s | vs bare loop (ratio of medians) | per-round ratio, quartiles |"
             + (" MFU |" if mfu else ""), "|---|---|---|---|---|---|" + ("---|" if mfu else "")]
    payload = {"model": args.model, "device": str(device), "amp": args.amp, "steps": args.steps, "results": []}
    for batch in args.batch:
        encoders_cfg = [f"model.encoders.{m}.{k}={v}" for m in shapes for k, v in
                        {"name": encoder, "dim": enc_opts["dim"], "hidden": enc_opts["hidden"]}.items()]
        base = ["data.dataset=bench_tensors", f"data.batch_size={batch}", "train.progress=false", "wandb=false",
                f"train.device={args.device}", f"train.amp={args.amp}", "data.held_out_ratio=0", *optim, *encoders_cfg,
                f"train.channels_last={str(best).lower()}",
                *(["train.compile=true"] if args.compile else [])]
        trainers = {}
        for strategy in args.strategies:
            BenchTensors.size = batch * args.steps
            extra = []
            if strategy == "gblend":  # gblend needs a held-out set V: more samples, the same training batches
                BenchTensors.size = size_with_held_out(batch * args.steps, 0.05)
                extra = ["data.held_out_ratio=0.05"]
            if strategy == "umt":  # timed in its student phase (the teachers' forward + distillation)
                extra = ["umt.teacher_epochs=1"]
            trainers[strategy] = build_trainer(load_config(None, [*base, f"strategy={strategy}", *extra]))
            if strategy == "umt":
                trainers[strategy].strategy.on_epoch_start(2, trainers[strategy].context)  # switch to the student
            assert len(trainers[strategy].splits.train) == batch * args.steps
        data = trainers[args.strategies[0]].splits.train
        inputs = {m: x.to(device) for m, x in data.inputs.items()}
        targets = data.targets.to(device)
        torch.manual_seed(0)
        bare = BareModel({m: build_encoder(encoder, s, **enc_opts, dropout=0.0) for m, s in shapes.items()}).to(device)
        if best:
            bare = bare.to(memory_format=torch.channels_last)
            inputs = {m: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                      for m, x in inputs.items()}
        o = load_config(None, optim).optim
        bare_opt = build_optimizer(o.name, bare.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                   fused=best and device.type == "cuda")
        bare_step = torch.compile(bare) if args.compile else bare

        def bare_epoch():
            bare.train()
            for idx in torch.randperm(len(targets), device=device).split(batch):
                x = {m: v[idx] for m, v in inputs.items()}
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(bare_step(x), targets[idx])
                bare_opt.zero_grad(set_to_none=True)
                loss.backward()
                bare_opt.step()
            return args.steps

        def blendtune_epoch(trainer):
            trainer.strategy.on_epoch_start(1, trainer.context)  # e.g. PMR's prototypes (a per-epoch cost)
            trainer.train_epoch(1)
            return len(trainer.train_loader)

        runs = {"bare": bare_epoch, **{s: (lambda t=t: blendtune_epoch(t)) for s, t in trainers.items()}}
        steps = {}
        for name, run in runs.items():  # warm-up round: allocator, kernels, thread pools
            steps[name] = run()

        def rate(name):
            return steps[name] / timed(runs[name], sync)
        samples = alternate({name: (lambda n=name: rate(n)) for name in runs}, args.repeats)
        bare_rate = median(samples["bare"])
        for name, xs in samples.items():
            payload["results"].append({"batch": batch, "loop": name, "steps_per_s": xs, "steps": steps[name]})
            ratio = median(xs) / bare_rate
            paired = sorted(x / b for x, b in zip(xs, samples["bare"]))  # same round: same machine state
            q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
            label = ("best-practice PyTorch" if best else "bare PyTorch") if name == "bare" else f"blendtune {name}"
            util = (f" {median(xs) * batch * args.gflop_per_sample / 1e3 / args.peak_tflops:.1%} |" if mfu else "")
            table.append(f"| {batch} | {label} | {median(xs):.2f} | {median(xs) * batch:.0f} | "
                         f"{ratio:.3f} ({(ratio - 1) * 100:+.1f}%) | {q1:.3f} - {q3:.3f} |{util}")
    write(f"step_overhead_{args.model}_{device.type}", payload, table,
          f"Model {args.model}, {args.steps} steps per timed epoch, median of {args.repeats} alternated rounds, "
          f"precision {args.amp}, baseline {'best-practice' if best else 'plain'}"
          f"{', torch.compile' if args.compile else ''}.")


if __name__ == "__main__":
    main()
