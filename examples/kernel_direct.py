"""Call a fused adapter kernel directly: ``lora_linear`` on CUDA (Triton where tuned), with the
torch reference on the CPU; the same call works on both and is checked against float64.

    python examples/kernel_direct.py [--tokens 4096] [--features 1024] [--rank 16] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

from lifelong.kernels import lora_linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="small shapes, for tests")
    args = parser.parse_args()
    m, d, r = (64, 48, 4) if args.smoke else (args.tokens, args.features, args.rank)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
    lora_a = (torch.randn(r, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    lora_b = (torch.randn(d, r, device=device, dtype=dtype) / r**0.5).requires_grad_()
    y = lora_linear(x, weight, None, lora_a, lora_b, 2.0)  # backend="auto": Triton or composite on CUDA
    y.float().pow(2).mean().backward()
    x64, w64, a64, b64 = (t.detach().double() for t in (x, weight, lora_a, lora_b))
    expected = x64 @ w64.T + 2.0 * (x64 @ a64.T) @ b64.T
    error = (y.double() - expected).abs().max().item() / expected.abs().max().item()
    print(f"device {device}, {dtype}, x {tuple(x.shape)}, r={r}: relative error vs float64 = {error:.2e}")
    print(f"gradients: dx {tuple(x.grad.shape)}, dA {tuple(lora_a.grad.shape)}, dB {tuple(lora_b.grad.shape)}")


if __name__ == "__main__":
    main()
