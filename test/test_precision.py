"""train.precision: mixed precision is chosen by what the hardware runs natively (stand-ins for CPU flags and GPUs)."""
import pytest
import torch

from speechclip_plus.config import ConfigError
from speechclip_plus.train.precision import amp_dtype, autocast, cpu_flags, needs_grad_scaler, precision_name


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def gpu(major, minor=0):
    return lambda device: (major, minor)


def test_cpu_bf16_only_with_native_support(tmp_path):
    avx2 = write(tmp_path, "avx2", "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    avx512 = write(tmp_path, "avx512", "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = write(tmp_path, "arm", "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    cpu = torch.device("cpu")
    assert cpu_flags(avx2) == {"fpu", "sse", "avx2", "fma"}
    assert amp_dtype(cpu, "auto", avx2) is None
    assert amp_dtype(cpu, "auto", avx512) is torch.bfloat16
    assert amp_dtype(cpu, "auto", arm) is torch.bfloat16
    assert amp_dtype(cpu, "fp32", avx512) is None
    assert amp_dtype(cpu, "auto", str(tmp_path / "missing")) is None
    assert amp_dtype(cpu, "bf16", avx2) is torch.bfloat16  # forced: emulated, but the user asked for it
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        amp_dtype(cpu, "fp16", avx2)


def test_gpu_bf16_from_ampere_on_fp16_with_a_scaler_before():
    cuda = torch.device("cuda")
    assert amp_dtype(cuda, "auto", capability=gpu(8, 0)) is torch.bfloat16  # A100
    assert amp_dtype(cuda, "auto", capability=gpu(9, 0)) is torch.bfloat16  # H100
    assert amp_dtype(cuda, "auto", capability=gpu(7, 0)) is torch.float16  # V100
    assert amp_dtype(cuda, "fp16", capability=gpu(8, 6)) is torch.float16
    assert amp_dtype(cuda, "fp32", capability=gpu(8, 6)) is None
    with pytest.raises(ConfigError, match="Ampere"):
        amp_dtype(cuda, "bf16", capability=gpu(7, 5))
    assert needs_grad_scaler(torch.float16) and not needs_grad_scaler(torch.bfloat16) and not needs_grad_scaler(None)
    assert precision_name(cuda, "auto", capability=gpu(7, 0)) == "float16 autocast + GradScaler"
    assert precision_name(cuda, "auto", capability=gpu(8, 0)) == "bfloat16 autocast"
    with pytest.raises(ConfigError, match="train.precision"):
        amp_dtype(cuda, "fp8", capability=gpu(8, 0))


def test_autocast_follows_the_choice():
    cpu = torch.device("cpu")
    assert precision_name(cpu, "fp32") == "float32"
    x = torch.randn(4, 4)
    with autocast(cpu, None):
        assert (x @ x).dtype is torch.float32
    with autocast(cpu, torch.bfloat16):
        assert (x @ x).dtype is torch.bfloat16
