"""Every registered pathology foundation encoder at its published size, with random weights (no network).

    python benchmarks/encoders.py                      # all encoders, CPU (or CUDA when present)
    python benchmarks/encoders.py --encoders uni conch --n 8 --device cuda

For each encoder: build the published architecture with random weights (parameter count checked against the
registry), save its weights to safetensors and load them back through ``weights=`` (features must be identical),
then time `FoundationEncoder.transform` on ``--n`` random patches of its native size after one warm-up batch.
Prints one JSON line per encoder: parameters, embedding size, build, save/load and encode times, patches per
second, and peak memory: of this process so far (RSS, so run one encoder per call to read its own) and, on CUDA,
of the device during encoding. The tests build reduced networks (or UNI
at full size); this script builds each one whole. Random weights make speed real and features meaningless.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run(name: str, n: int, device: str, workdir: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    import omx
    from omx.encoders._foundation import get_spec

    spec = get_spec(name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", omx.OmxWarning)
        encoder = omx.encoders.get_encoder(name, weights="random", device=device, batch_size=max(1, min(n, 32)))
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in encoder.module.parameters())
    patches = np.random.default_rng(0).integers(0, 256, (n, spec.patch_px, spec.patch_px, 3), dtype=np.uint8)
    encoder.transform(patches[: min(2, n)])  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    features = encoder.transform(patches)
    encode_s = time.perf_counter() - t
    file = workdir / f"{name}.safetensors"
    t = time.perf_counter()
    target = encoder.module.trunk if spec.pooling != "conch" else encoder.module
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(file))
    loaded = omx.encoders.get_encoder(name, weights=file, device=device, batch_size=encoder.batch_size)
    roundtrip_s = time.perf_counter() - t
    k = min(2, n)  # the same batch through both: kernels may differ with the batch size
    same = bool(np.array_equal(loaded.transform(patches[:k]), encoder.transform(patches[:k])))
    file.unlink()
    record = {
        "encoder": name,
        "device": torch.cuda.get_device_name() if encoder.device.type == "cuda" else "cpu",
        "n_params": n_params,
        "n_params_expected": spec.n_params,
        "dim": int(features.shape[1]),
        "patch_px": spec.patch_px,
        "build_s": round(build_s, 2),
        "save_load_s": round(roundtrip_s, 2),
        "weights_round_trip_identical": same,
        "n_patches": n,
        "encode_s": round(encode_s, 3),
        "patches_per_s": round(n / encode_s, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if encoder.device.type == "cuda":
        record["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    del encoder, loaded
    return record


def main() -> None:
    import omx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=omx.encoders.registered())
    parser.add_argument("--n", type=int, default=4, help="patches to encode per encoder")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omx_encoders_") as tmp:
        for name in args.encoders:
            print(json.dumps(run(name, args.n, args.device, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
