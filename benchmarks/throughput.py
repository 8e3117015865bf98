"""Encoding and training throughput (patches per second) on the CPU and, when there is one, on a CUDA GPU.

    python benchmarks/throughput.py                               # every device present, all parts
    python benchmarks/throughput.py --devices cpu                 # about 10 minutes on 2 shared cores
    python benchmarks/throughput.py --devices cuda                # one H200: a few minutes
    python benchmarks/throughput.py --parts vit --vits large      # only ViT-L/16
    python benchmarks/throughput.py --devices cpu --vit-n 8 8 8 --n 2048

Prints one JSON line per device with the device's name on stdout, and a table of all devices on stderr at the
end. Three parts, chosen with ``--parts``:

``cnn``: patches per second of (a) the handcrafted encoder (CPU only: numpy), (b) a SmallCNN encoder
(`TorchEncoder`, inference) and (c) one training epoch of `CNNRegressor` (augmentation, forward, backward), on
``--n`` random 64-px patches (speed does not depend on content). For training it also reports the share of the
epoch spent moving batches from host memory to the device (`to_tensor`, timed with the device synchronised
before and after, so the figure is an upper bound), and on CUDA the GPU utilisation sampled by nvidia-smi
during the epoch.

``contrastive``: seconds per training epoch of `Contrastive` (with spot context, 6 neighbours) at the size of a
her2st fold (600 spots, 785 genes), on handcrafted-size features (752) and on patches (its CNN tower). Only the
training of the towers is timed, not the ridge fits after it: on CUDA the difference of a 4-epoch and a 1-epoch
fit, on the CPU one 1-epoch fit (set-up included; a patch epoch takes most of a minute there).

``vit``: for ViT-S/16, ViT-B/16 and ViT-L/16 (``timm:vit_*_patch16_224`` with random weights: speed does not
depend on them; ``--vits``), 224-px input, bf16 autocast on CUDA as the encoder runs them:
(1) ``bare``: the module alone on random input already on the device and normalised, under
    `torch.inference_mode` and the encoder's autocast, after warm-up, timed between device synchronisations;
(2) ``transform``: `encoder.transform` on in-memory uint8 patches (host-to-device copy and normalisation
    included);
(3) ``e2e``: `omx.pp.encode` of every spot of a synthetic H&E-like slide (0.5 um/px, spots 112 um apart, one
    112-um patch of 224 px per spot, written to zarr in a temporary folder and read back with
    `spatialdata.read_zarr`; the freshly written store is likely in the page cache). It reports the share of
    the wall time spent outside `encoder.transform` (``e2e_share_waiting``: reading, cutting and collecting,
    i.e. the time the encoder waited for data), the ratio of end-to-end to bare-forward patches per second
    (``e2e_over_bare``), and on CUDA the mean GPU utilisation sampled by nvidia-smi during (3) and the peak GPU
    memory allocated by torch over (1)-(3). ``--num-workers`` sets the threads that cut patches ahead of the
    encoder (`omx.pp.encode`'s default: several on a GPU, one on the CPU).
The target for ViT-L/16 on one H100/H200-class GPU is >= 2,000 patches/s end to end and >= 0.5 x bare forward.
Patch counts default per device and model (few on the CPU, where ViT-L runs at about one patch per second);
``--vit-n`` sets them for all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

#: ``--vits`` choices: (timm architecture, label).
VITS = {
    "small": ("vit_small_patch16_224", "ViT-S/16"),
    "base": ("vit_base_patch16_224", "ViT-B/16"),
    "large": ("vit_large_patch16_224", "ViT-L/16"),
}
#: Patches for (bare forward, transform, end to end) per device type and ViT, and the batch size per device type.
VIT_N = {
    "cuda": {"small": (8192, 8192, 8000), "base": (8192, 8192, 8000), "large": (8192, 8192, 8000)},
    "cpu": {"small": (32, 32, 32), "base": (16, 16, 16), "large": (8, 8, 8)},
}
VIT_BATCH = {"cuda": 256, "cpu": 4}
#: Synthetic slide: microns per pixel, spot pitch and patch side in microns (224 px at 0.5 um/px).
MPP, SIZE_UM = 0.5, 112.0
TARGET_PER_S, TARGET_OVER_BARE = 2000, 0.5
PARTS = ["cnn", "contrastive", "vit"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def sampler_for(device) -> GpuSampler | None:
    return GpuSampler(device.index or 0) if device.type == "cuda" else None


def measure_cnn(device_str: str, n: int, patch_px: int, batch_size: int) -> dict:
    """Handcrafted and SmallCNN encoding, and a CNNRegressor training epoch."""
    import torch

    import omx
    import omx.encoders._torch as torch_module
    from omx.encoders import HandcraftedEncoder, SmallCNN, TorchEncoder

    device = torch.device(device_str)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (n, patch_px, patch_px, 3), dtype=np.uint8)
    Y = rng.normal(size=(n, 50)).astype(np.float32)
    out = {"n_patches": n, "patch_px": patch_px, "batch_size": batch_size}

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
        sampler = sampler_for(device)
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
    return out


def contrastive_epoch_s(device, patch_px: int, n: int = 600, n_genes: int = 785) -> dict:
    """Seconds per epoch of `Contrastive` on features and on patches, at the size of a her2st fold.

    Only the training of the towers is timed (`Contrastive._fit_rows`), not the ridge fits that follow it. On
    CUDA: the difference of a 4-epoch and a 1-epoch fit; on the CPU, where a patch epoch takes most of a minute,
    one 1-epoch fit (its set-up included, so an upper bound).
    """
    import omx
    from omx.models._contrastive import Contrastive

    epochs = (1, 4) if device.type == "cuda" else (1,)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 100.0
    Y = rng.normal(size=(n, n_genes)).astype(np.float32)
    inputs = {
        "features": rng.normal(size=(n, 752)).astype(np.float32),
        "patches": rng.integers(0, 256, (n, patch_px, patch_px, 3), dtype=np.uint8),
    }
    training = [0.0]
    original = Contrastive._fit_rows

    def timed_fit_rows(self, *args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            sync(device)
            training[0] += time.perf_counter() - t0

    out = {}
    Contrastive._fit_rows = timed_fit_rows
    try:
        for image, X in inputs.items():
            extra = {"patch_px": patch_px, "head": "ridge"} if image == "patches" else {}
            times = []
            for e in epochs:
                model = omx.models.Contrastive(
                    image=image, epochs=e, val_fraction=0, device=device.type, show_progress_bar=False, **extra
                )
                training[0] = 0.0
                model.fit(X, Y, coords=coords)
                times.append(training[0])
            seconds = times[0] if len(epochs) == 1 else (times[-1] - times[0]) / (epochs[-1] - epochs[0])
            out[f"contrastive_{image}_epoch_s"] = round(seconds, 3)
    finally:
        Contrastive._fit_rows = original
    return out


def write_slide(folder: Path, n_spots: int):
    """Write a synthetic slide with ``n_spots`` spots 112 um apart to zarr and return it read back."""
    import spatialdata as sd

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from patches import synthetic  # benchmarks/patches.py: pink background, purple noise, spots on a grid

    side = int(np.ceil(np.sqrt(n_spots)))
    size_px = (side + 1) * round(SIZE_UM / MPP)  # spot pitch size_px * mpp / (side + 1) = SIZE_UM
    path = folder / f"slide_{n_spots}.zarr"
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "zarr v3 autosharding", UserWarning)
        synthetic(size_px, n_spots, mpp=MPP).write(path)
    log(f"wrote a {size_px} x {size_px} px slide with {n_spots} spots in {time.perf_counter() - t:.1f} s")
    return sd.read_zarr(path)


def autocast_of(encoder):
    """The autocast `TorchEncoder` runs its module under on its device: (enabled, dtype)."""
    import torch

    use_amp = encoder.amp and encoder.device.type == "cuda"
    return use_amp, torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16


def bare_forward(encoder, n: int, warm: int) -> tuple[int, float]:
    """Patches run and patches per second of the module alone, on normalised random input on the device."""
    import torch

    dev, bs = encoder.device, encoder.batch_size
    x = torch.randn(bs, 3, encoder.patch_px, encoder.patch_px, device=dev)
    enabled, dtype = autocast_of(encoder)
    n_batches = max(1, math.ceil(n / bs))
    with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=dtype, enabled=enabled):
        for _ in range(3 if dev.type == "cuda" else 1):  # warm-up
            encoder.module(x[:warm])
        sync(dev)
        t = time.perf_counter()
        for _ in range(n_batches):
            encoder.module(x)
        sync(dev)
        seconds = time.perf_counter() - t
    return n_batches * bs, n_batches * bs / seconds


def end_to_end(encoder, slide, warm: int, num_workers: int | None) -> dict:
    """`omx.pp.encode` of every spot of `slide`, with the time spent inside `encoder.transform`."""
    import omx

    keys = {"image_key": "he", "shapes_key": "spots"}
    kwargs = {"size_um": SIZE_UM, "context": (1.0,), "num_workers": num_workers, "show_progress_bar": False}
    out = {"num_workers": num_workers}
    spots = omx.pp.resolve_spots(slide, **keys)
    omx.pp.encode(spots.subset(np.arange(min(warm, spots.n_spots))), encoder, **kwargs)  # warm-up (imports, I/O)

    inside = [0.0]
    original = encoder.transform

    def timed_transform(patches):
        t0 = time.perf_counter()
        try:
            return original(patches)
        finally:
            inside[0] += time.perf_counter() - t0

    encoder.transform = timed_transform  # encode calls encoder.transform once per batch of patches
    sampler = sampler_for(encoder.device)
    try:
        t = time.perf_counter()
        if sampler is not None:
            with sampler:
                feats = omx.pp.encode(slide, encoder, **keys, **kwargs, inplace=False)
        else:
            feats = omx.pp.encode(slide, encoder, **keys, **kwargs, inplace=False)
        seconds = time.perf_counter() - t
    finally:
        del encoder.transform
    if feats.shape != (spots.n_spots, encoder.dim) or not np.isfinite(feats).all():
        raise RuntimeError(f"omx.pp.encode returned {feats.shape} features (or non-finite values).")
    out.update(
        {
            "e2e_n": int(spots.n_spots),
            "e2e_per_s": round(spots.n_spots / seconds, 2),
            "e2e_s": round(seconds, 2),
            "e2e_share_waiting": round(max(0.0, 1.0 - inside[0] / seconds), 3),
        }
    )
    if sampler is not None:
        out["gpu_utilisation_e2e_pct"] = sampler.mean
    return out


def measure_vit(which: str, device_str: str, sizes, batch_size: int, patches: np.ndarray, slide, num_workers) -> dict:
    """Bare forward, transform and end-to-end patches per second of one ViT on one device."""
    import torch

    import omx

    arch, label = VITS[which]
    device = torch.device(device_str)
    n_bare, n_transform, _ = sizes
    warm = batch_size if device.type == "cuda" else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", omx.OmxWarning)  # random weights: fine for speed
        encoder = omx.encoders.get_encoder(f"timm:{arch}", weights="random", device=device_str, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    enabled, dtype = autocast_of(encoder)
    out = {
        "model": label,
        "arch": arch,
        "params_m": round(sum(p.numel() for p in encoder.module.parameters()) / 1e6, 1),
        "patch_px": encoder.patch_px,
        "batch_size": batch_size,
        "autocast": str(dtype).removeprefix("torch.") if enabled else None,
    }
    out["bare_n"], bare = bare_forward(encoder, n_bare, warm)
    out["bare_per_s"] = round(bare, 2)
    log(f"{label} bare forward: {bare:,.1f} patches/s")

    encoder.transform(patches[:warm])  # warm-up: pinned memory, the normalisation kernels
    sync(device)
    t = time.perf_counter()
    encoder.transform(patches[:n_transform])
    out["transform_n"] = n_transform
    out["transform_per_s"] = round(n_transform / (time.perf_counter() - t), 2)
    log(f"{label} encoder.transform: {out['transform_per_s']:,.1f} patches/s")

    out.update(end_to_end(encoder, slide, warm, num_workers))
    out["e2e_over_bare"] = round(out["e2e_per_s"] / bare, 3)
    log(f"{label} end to end: {out['e2e_per_s']:,.1f} patches/s, {out['e2e_share_waiting']:.0%} waiting for data")
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if which == "large":
            out["target_met"] = out["e2e_per_s"] >= TARGET_PER_S and out["e2e_over_bare"] >= TARGET_OVER_BARE
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_vits(device_str: str, vits: list[str], vit_n, batch_size: int | None, num_workers) -> list[dict]:
    import torch

    kind = torch.device(device_str).type
    batch_size = batch_size or VIT_BATCH[kind]
    sizes = {w: tuple(vit_n) if vit_n else VIT_N[kind][w] for w in vits}
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (max(s[1] for s in sizes.values()), 224, 224, 3), dtype=np.uint8)
    results, slides = [], {}
    with tempfile.TemporaryDirectory(prefix="omx_throughput_") as folder:
        for which in vits:
            n_e2e = sizes[which][2]
            if n_e2e not in slides:
                slides[n_e2e] = write_slide(Path(folder), n_e2e)
            slide = slides[n_e2e]
            results.append(measure_vit(which, device_str, sizes[which], batch_size, patches, slide, num_workers))
    return results


def fmt(value, spec: str | None = None) -> str:
    """``value`` formatted with `spec`; by default with one decimal, or two below 10."""
    if value is None:
        return "-"
    return format(value, spec or (",.2f" if abs(value) < 10 else ",.1f"))


def print_table(results: list[dict]) -> None:
    lines = []
    for res in results:
        lines.append(f"\n{res['device']}  (load average {res['load_avg_1min']})")
        if "cnn_encode_per_s" in res:
            lines.append(
                f"  64-px patches: handcrafted {fmt(res.get('handcrafted_encode_per_s'), ',')}/s, "
                f"SmallCNN encode {res['cnn_encode_per_s']:,}/s, CNNRegressor train {res['train_per_s']:,}/s "
                f"({res['train_share_loading']:.1%} loading"
                + (f", GPU {res['gpu_utilisation_pct']}%)" if res.get("gpu_utilisation_pct") is not None else ")")
            )
        if "contrastive_patches_epoch_s" in res:
            lines.append(
                f"  Contrastive epoch (600 spots): {res['contrastive_features_epoch_s']} s on features, "
                f"{res['contrastive_patches_epoch_s']} s on 64-px patches"
            )
        if res.get("vits"):
            head = ("model", "batch", "bare/s", "transform/s", "e2e/s", "e2e/bare", "waiting", "GPU %", "peak GiB")
            widths = (9, 6, 10, 12, 10, 9, 8, 6, 9)
            lines.append("  " + " ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
            for v in res["vits"]:
                row = (
                    v["model"],
                    str(v["batch_size"]),
                    fmt(v["bare_per_s"]),
                    fmt(v["transform_per_s"]),
                    fmt(v["e2e_per_s"]),
                    fmt(v["e2e_over_bare"], ".2f"),
                    fmt(v["e2e_share_waiting"], ".0%"),
                    fmt(v.get("gpu_utilisation_e2e_pct"), ".0f"),
                    fmt(v.get("peak_gpu_mem_gib"), ".2f"),
                )
                lines.append("  " + " ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
                if "target_met" in v:
                    lines.append(
                        f"  {v['model']} target (>= {TARGET_PER_S:,}/s end to end and >= {TARGET_OVER_BARE} x bare): "
                        + ("met" if v["target_met"] else "NOT met")
                    )
            n = ", ".join(f"{v['model']} {v['bare_n']}/{v['transform_n']}/{v['e2e_n']}" for v in res["vits"])
            lines.append(f"  patches measured (bare/transform/e2e): {n}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--n", type=int, default=None, help="cnn part: patches (default 8192; 1024 on the CPU)")
    parser.add_argument("--patch-px", type=int, default=64, help="cnn part: patch side")
    parser.add_argument("--batch-size", type=int, default=256, help="cnn part: batch size")
    parser.add_argument("--vits", nargs="+", choices=list(VITS), default=list(VITS))
    parser.add_argument(
        "--vit-n",
        nargs=3,
        type=int,
        default=None,
        metavar=("BARE", "TRANSFORM", "E2E"),
        help="vit part: patches per measurement for every ViT (default per device and model, see VIT_N)",
    )
    parser.add_argument("--vit-batch-size", type=int, default=None, help="vit part: default 256 on CUDA, 8 on CPU")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(8, max(1, (os.cpu_count() or 2) // 2)),
        help="passed to omx.pp.encode when it takes num_workers (default: half the cores, at most 8)",
    )
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for dev in devices:
        device = torch.device(dev)
        res = {"device": device_name(device), "load_avg_1min": round(os.getloadavg()[0], 1)}
        t = time.perf_counter()
        if "cnn" in args.parts:
            n = args.n or (8192 if device.type == "cuda" else 1024)
            log(f"{res['device']}: handcrafted, SmallCNN and CNNRegressor on {n} patches")
            res.update(measure_cnn(dev, n, args.patch_px, args.batch_size))
        if "contrastive" in args.parts:
            log(f"{res['device']}: Contrastive epochs")
            res.update(contrastive_epoch_s(device, args.patch_px))
        if "vit" in args.parts:
            res["vits"] = measure_vits(dev, args.vits, args.vit_n, args.vit_batch_size, args.num_workers)
        res["total_s"] = round(time.perf_counter() - t, 1)
        res["load_avg_1min_end"] = round(os.getloadavg()[0], 1)
        print(json.dumps(res), flush=True)
        results.append(res)
    print_table(results)


if __name__ == "__main__":
    main()
