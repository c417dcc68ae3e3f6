"""Mixed precision is chosen by what the hardware runs natively."""
import torch

from speechclip_plus.train.precision import amp_dtype, autocast, cpu_flags, precision_name


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cpu_bf16_only_with_native_support(tmp_path):
    avx2 = write(tmp_path, "avx2", "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    avx512 = write(tmp_path, "avx512", "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = write(tmp_path, "arm", "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    cpu = torch.device("cpu")
    assert cpu_flags(avx2) == {"fpu", "sse", "avx2", "fma"}
    assert amp_dtype(cpu, True, avx2) is None
    assert amp_dtype(cpu, True, avx512) is torch.bfloat16
    assert amp_dtype(cpu, True, arm) is torch.bfloat16
    assert amp_dtype(cpu, False, avx512) is None
    assert amp_dtype(cpu, True, str(tmp_path / "missing")) is None
    assert amp_dtype(torch.device("cuda"), True, avx2) is torch.float16


def test_autocast_follows_the_choice():
    assert precision_name(torch.device("cpu"), False) == "float32"
    assert precision_name(torch.device("cpu"), True) == (
        "bfloat16 autocast" if amp_dtype(torch.device("cpu"), True) else "float32")
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu"), False):
        assert (x @ x).dtype is torch.float32
    expected = amp_dtype(torch.device("cpu"), True) or torch.float32
    with autocast(torch.device("cpu"), True):
        assert (x @ x).dtype is expected
