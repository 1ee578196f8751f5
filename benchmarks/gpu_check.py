"""The GPU check of issue 17: bf16 SWITCH and GKD training steps, tokens/s, the rollout's
speed-up over the naive loop, and the cost of drawing rollout noise on the device.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json    # ~5 minutes

Not part of CI (it needs a CUDA device and refuses to run without one). It runs
benchmarks/kd_speed.py's rollout comparison (bf16 and fp32) and its SWITCH and GKD training
steps in bf16 (SmolLM2-135M teacher, 10-layer student; --random-init: the same architectures with
random weights when the embedded SmolLM2 is not installed), then times ``Noise.gumbel`` for a
batch of 8 rows over SmolLM2's 49,152-token vocabulary on the GPU and on the CPU. Paste the
printed tables into docs/results.md ("Scaling out").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def noise_timing(batch: int = 8, vocab: int = 49_152, reps: int = 50) -> dict:
    import torch

    from lmsmith.generation import Noise

    noise = Noise.draw(batch, seed=0)
    out = {}
    for dev in ("cuda", "cpu"):
        pos = torch.zeros(batch, dtype=torch.long)
        noise.gumbel("student", pos, vocab, device=dev)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(reps):
            noise.gumbel("student", pos + i, vocab, device=dev)
        torch.cuda.synchronize()
        out[dev] = (time.perf_counter() - t0) / reps * 1e3
    g_gpu = noise.gumbel("student", torch.arange(batch), vocab, device="cuda").cpu()
    g_cpu = noise.gumbel("student", torch.arange(batch), vocab, device="cpu")
    return {
        "ms_per_draw": out,
        "gpu_over_cpu_speedup": out["cpu"] / out["cuda"],
        "same_noise_on_both": bool(torch.allclose(g_gpu, g_cpu, rtol=0, atol=1e-5)),
    }


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device (it is not part of CI)")
    import kd_speed

    speed_json = Path(args.json).with_suffix(".kd_speed.json") if args.json else None
    kd_speed.main(
        [
            "--precision",
            "bf16",
            "--rollout-precisions",
            "bf16,fp32",
            "--skip-trl",
            "--prompts",
            str(args.prompts),
            "--batch",
            str(args.batch),
            "--max-new",
            str(args.max_new),
            "--steps",
            str(args.steps),
        ]  # fmt: skip
        + (["--random-init"] if args.random_init else [])
        + (["--json", str(speed_json)] if speed_json else [])
    )
    noise = noise_timing(args.batch)
    print(
        f"\n| Noise.gumbel, {args.batch} x 49152 | ms per draw |\n|---|---|\n"
        f"| GPU | {noise['ms_per_draw']['cuda']:.3f} |\n| CPU | {noise['ms_per_draw']['cpu']:.3f} |\n"
        f"\nGPU / CPU speed-up {noise['gpu_over_cpu_speedup']:.1f}x; "
        f"the same noise on both: {noise['same_noise_on_both']}"
    )
    if args.json:
        from lmsmith.runs import write_json

        result = {"noise": noise, "device": torch.cuda.get_device_name(0)}
        if speed_json and speed_json.exists():
            result["kd_speed"] = json.loads(speed_json.read_text())
        write_json(args.json, result)
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
