"""Encoding and training throughput (patches per second) on the CPU and, when there is one, on a CUDA GPU.

    python benchmarks/throughput.py                    # every device present
    python benchmarks/throughput.py --devices cpu --n 2048

For each device: patches per second of (a) the handcrafted encoder (CPU only: numpy), (b) a SmallCNN encoder
(`TorchEncoder`, inference) and (c) one training epoch of `CNNRegressor` (augmentation, forward, backward).
For training it also reports the share of the epoch spent moving batches from host memory to the device
(`to_tensor`, timed with the device synchronised before and after, so the figure is an upper bound), and on
CUDA the GPU utilisation sampled by nvidia-smi during the epoch. (d) Seconds per training epoch of
`Contrastive` (with spot context, 6 neighbours) at the size of a her2st fold (600 spots, 785 genes): on
handcrafted-size features (752) and on patches (its CNN tower), from the difference of a 4-epoch and a
1-epoch fit. Patches are random uint8 RGB (speed does not
depend on content). Prints one JSON line per device with the device's name.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import threading
import time

import numpy as np


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuSampler:
    """GPU utilisation (%) sampled by nvidia-smi every 0.1 s in a background thread."""

    def __init__(self, index: int):
        self.index, self.samples, self._stop = index, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        f"--id={self.index}",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def measure(device_str: str, n: int, patch_px: int, batch_size: int) -> dict:
    import torch

    import omx
    import omx.encoders._torch as torch_module
    from omx.encoders import HandcraftedEncoder, SmallCNN, TorchEncoder

    device = torch.device(device_str)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (n, patch_px, patch_px, 3), dtype=np.uint8)
    Y = rng.normal(size=(n, 50)).astype(np.float32)
    out = {"device": device_name(device), "n_patches": n, "patch_px": patch_px, "batch_size": batch_size}

    if device.type == "cpu":
        enc = HandcraftedEncoder(patch_px=patch_px)
        t = time.perf_counter()
        enc.transform(patches)
        out["handcrafted_encode_per_s"] = round(n / (time.perf_counter() - t))

    enc = TorchEncoder(SmallCNN(None), patch_px=patch_px, batch_size=batch_size, device=device_str)
    enc.transform(patches[:batch_size])  # warm-up (CUDA context, kernels)
    sync(device)
    t = time.perf_counter()
    enc.transform(patches)
    sync(device)
    out["cnn_encode_per_s"] = round(n / (time.perf_counter() - t))

    loading = [0.0]
    original = torch_module.to_tensor

    def timed_to_tensor(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        x = original(*args, **kwargs)
        sync(device)
        loading[0] += time.perf_counter() - t0
        return x

    def one_epoch():
        return omx.models.CNNRegressor(
            patch_px=patch_px,
            epochs=1,
            batch_size=batch_size,
            val_fraction=0,
            device=device_str,
            show_progress_bar=False,
        ).fit(patches, Y)

    one_epoch()  # warm-up
    torch_module.to_tensor = timed_to_tensor
    try:
        sampler = GpuSampler(device.index or 0) if device.type == "cuda" else None
        sync(device)
        t = time.perf_counter()
        if sampler is not None:
            with sampler:
                one_epoch()
        else:
            one_epoch()
        sync(device)
        seconds = time.perf_counter() - t
    finally:
        torch_module.to_tensor = original
    out["train_per_s"] = round(n / seconds)
    out["train_share_loading"] = round(loading[0] / seconds, 3)
    if sampler is not None:
        out["gpu_utilisation_pct"] = sampler.mean
    out.update(contrastive_epoch_s(device, patch_px))
    return out


def contrastive_epoch_s(device, patch_px: int, n: int = 600, n_genes: int = 785) -> dict:
    """Seconds per epoch of `Contrastive` on features and on patches, at the size of a her2st fold."""
    import omx

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 100.0
    Y = rng.normal(size=(n, n_genes)).astype(np.float32)
    inputs = {
        "features": rng.normal(size=(n, 752)).astype(np.float32),
        "patches": rng.integers(0, 256, (n, patch_px, patch_px, 3), dtype=np.uint8),
    }
    out = {}
    for image, X in inputs.items():
        extra = {"patch_px": patch_px, "head": "ridge"} if image == "patches" else {}
        times = {}
        for epochs in (1, 4):
            model = omx.models.Contrastive(
                image=image, epochs=epochs, val_fraction=0, device=device.type, show_progress_bar=False, **extra
            )
            sync(device)
            t = time.perf_counter()
            model.fit(X, Y, coords=coords)
            sync(device)
            times[epochs] = time.perf_counter() - t
        out[f"contrastive_{image}_epoch_s"] = round((times[4] - times[1]) / 3, 3)
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--patch-px", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for dev in devices:
        n = args.n if dev != "cpu" else min(args.n, 4096)
        print(json.dumps(measure(dev, n, args.patch_px, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
