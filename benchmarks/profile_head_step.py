"""Where one training step of the head goes on a GPU (torch.profiler).

For a head step from cached features at paper size (ViT-B/16 taps at 512x512, the paper's
head, 156 queries, batch 4, bf16 autocast, the fused loss, AdamW) it prints the wall time
per step, the summed time of the step's CUDA kernels and how many it launches, and the top
ops by GPU time. Wall time far above kernel time means the step is bound by the host
(Python and launches), not by the GPU. Random features and labels: the cost does not
depend on their values. GPU only; not collected by pytest.

    python benchmarks/profile_head_step.py [--steps 10] [--kernels triton|torch]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--kernels", choices=("triton", "torch"), default="triton")
ARGS = parser.parse_args()
os.environ["CASCADE_CLIP_KERNELS"] = ARGS.kernels
os.environ["CASCADE_CLIP_BENCH_FULL"] = "1"  # bench_cache's ViT-B/16@512 setup
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cache as bc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from cascade_clip import cache  # noqa: E402
from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss  # noqa: E402
from cascade_clip.model.encoder import TapFeatures  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_head_step: needs a CUDA device")
        return 2
    setup, dev = bc.VIT_B16, torch.device("cuda")
    cfg = bc.setup_config(setup, ".")  # no data is read: features and labels are random
    torch.manual_seed(0)
    model = cache.build_model(cfg, dev).train()
    blocks = sum(len(s) for s in setup.stages)
    grid = setup.image_size // 16
    b, n, c = setup.batch, grid * grid, model.encoder.embed_dim
    feats = TapFeatures(
        taps=F.normalize(torch.randn(blocks, b, n, c, device=dev), dim=-1),
        global_token=F.normalize(torch.randn(b, c, device=dev), dim=-1),
        grid=(grid, grid),
    )
    text = F.normalize(torch.randn(setup.queries, c, device=dev), dim=-1)
    target = torch.randint(0, setup.queries, (b, setup.image_size, setup.image_size), device=dev)
    opt = torch.optim.AdamW([p for p in model.head.parameters() if p.requires_grad], lr=1e-6, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.forward_features(feats, text)
        loss = sigmoid_focal_dice_loss(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: Triton autotuning and compilation, cuBLAS heuristics
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(ARGS.steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / ARGS.steps * 1e3

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(ARGS.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / ARGS.steps
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  kernels={ARGS.kernels}")
    print(f"head step (batch {b}, {setup.queries} queries, {setup.image_size}px labels): "
          f"wall {wall_ms:.2f} ms, CUDA kernels {gpu_ms:.2f} ms in {len(kernels) / ARGS.steps:.0f} "
          f"launches per step, GPU busy {100 * gpu_ms / wall_ms:.0f}%")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
