"""Where the GPU time goes: top kernels of the SRS attention module and the fused DINO loss (fwd+bwd),
for benchmarks/NOTES.md. Run by scripts/gpu_check.sh after the benchmarks."""
import torch
from torch.profiler import ProfilerActivity, profile

from udi_kernels.losses import DINOLoss
from udi_kernels.nn import SRSAttention

DEVICE = torch.device("cuda")


def srs_attention_module_step():
    crops, N, S, C = 256, 196, 16, 384
    module = SRSAttention(C, 6).to(DEVICE)
    x = torch.randn(crops, N, C, device=DEVICE, requires_grad=True)
    index = torch.randint(0, N, (crops, S, 1), device=DEVICE, dtype=torch.int32)

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            out = module(x, index)
        out.float().square().mean().backward()
    return step


def dino_loss_step():
    B, K, ncrops = 128, 65536, 12
    loss = DINOLoss(K, ncrops, 0.04, 0.04, 0, 100).to(DEVICE)
    student = torch.randn(ncrops * B, K, device=DEVICE, dtype=torch.float16, requires_grad=True)
    teacher = torch.randn(2 * B, K, device=DEVICE, dtype=torch.float16)

    def step():
        loss(student, teacher, 0).backward()
    return step


def report(name, step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== {name}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    report("SRSAttention module fwd+bwd, student global, B=128, fp16 autocast", srs_attention_module_step())
    report("DINOLoss fwd+bwd, 12 crops, B=128, K=65536, fp16", dino_loss_step())
