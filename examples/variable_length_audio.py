"""Variable-length audio with a padding collate_fn and a sampler of your own, as PyTorch's DataLoader
takes them.

    PYTHONPATH=examples .venv/bin/python examples/variable_length_audio.py [--epochs 6]
"""
import argparse

import torch
from torch import nn

import blendtune
from my_av import TwoStreamNet, make_data


class Recordings(torch.utils.data.Dataset):
    """Clips of different lengths (48 to 64 samples), as a folder of recordings gives them."""

    def __init__(self, clips):
        self.clips, self.targets = clips, clips.targets

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        inputs, target = self.clips[i]
        return {"audio": inputs["audio"][:, : 48 + i % 17], "video": inputs["video"]}, target


def pad_audio(items):
    """Zero-pads each batch's clips to its longest one (TwoStreamNet pools over time)."""
    inputs, targets = zip(*items)
    longest = max(x["audio"].shape[-1] for x in inputs)
    audio = torch.stack([nn.functional.pad(x["audio"], (0, longest - x["audio"].shape[-1])) for x in inputs])
    return {"audio": audio, "video": torch.stack([x["video"] for x in inputs])}, torch.as_tensor(targets)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    train, test = (Recordings(d) for d in make_data())
    # over-sample class 0 twice as often: a sampler orders the (one-worker) run's training batches
    weights = [2.0 if int(t) == 0 else 1.0 for t in train.targets]
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(train))
    result = blendtune.fit(TwoStreamNet, train, test, strategy="ogm_ge", alpha=0.8, epochs=args.epochs, lr=1e-3,
                           optimizer="adam", collate_fn=pad_audio, sampler=sampler, held_out=test,
                           loader_options={"pin_memory": False}, progress=False)
    print(f"variable-length audio: test accuracy fused {result.metrics['acc/test/fused']:.3f}")
    print(f"predicted classes of 5 test clips: {result.predict([test[i] for i in range(5)]).classes.tolist()}")


if __name__ == "__main__":
    main()
