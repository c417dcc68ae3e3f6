"""compat: the torchaudio / huggingface_hub APIs s3prl 0.4.18 uses, restored without editing site-packages."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from speechclip_plus import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter (global import state stays clean) from the repository root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_s3prl_hub_needs_apply():
    without = run_python("import s3prl.hub")
    assert without.returncode != 0 and "set_audio_backend" in without.stderr
    with_apply = run_python(
        "from speechclip_plus import compat\n"
        "hub = compat.import_s3prl_hub()\n"
        "assert callable(hub.hubert_local) and callable(hub.fbank)\n"
        "print('ok')"
    )
    assert with_apply.returncode == 0, with_apply.stderr[-2000:]
    assert with_apply.stdout.strip().endswith("ok")


def test_set_audio_backend_exists_after_apply():
    compat.apply()
    compat.apply()  # idempotent
    import torchaudio

    assert torchaudio.set_audio_backend("sox_io") is None


def tone(seconds, rate, freq=440.0):
    t = torch.arange(int(seconds * rate)) / rate
    return 0.3 * torch.sin(2 * torch.pi * freq * t)


def test_apply_effects_tensor_resamples():
    compat.apply()
    import torchaudio

    x = torch.stack([tone(0.5, 16000), tone(0.5, 16000, 880.0)])  # (channels, time)
    y, sr = torchaudio.sox_effects.apply_effects_tensor(x, 16000, [["rate", "8000"]])
    assert sr == 8000 and y.shape == (2, 4000)
    # the pitch survives: the spectrum peak of channel 0 is still at 440 Hz
    spec = torch.fft.rfft(y[0]).abs()
    assert abs(spec.argmax().item() * 8000 / y.shape[1] - 440) < 5
    z, sr = torchaudio.sox_effects.apply_effects_tensor(
        x.t(), 16000, [["rate", "22050"]], channels_first=False
    )
    assert sr == 22050 and z.shape == (11025, 2)


def test_apply_effects_file(tmp_path):
    compat.apply()
    import torchaudio

    path = tmp_path / "a.wav"
    sf.write(path, tone(1.0, 16000).numpy(), 16000)
    y, sr = torchaudio.sox_effects.apply_effects_file(str(path), [["channels", "1"], ["rate", "24000"]])
    assert sr == 24000 and y.shape == (1, 24000)
    ref = sf.read(path, dtype="float32")[0]
    assert np.isclose(np.abs(y.numpy()).max(), np.abs(ref).max(), rtol=0.05)
    with pytest.raises(RuntimeError, match="sox failed"):
        torchaudio.sox_effects.apply_effects_file(str(tmp_path / "missing.wav"), [["rate", "8000"]])


def test_hffolder_token_file(tmp_path):
    compat.apply()
    import huggingface_hub

    assert hasattr(huggingface_hub, "HfFolder")
    # token round trip in a fresh interpreter whose HF home is a temporary directory
    code = (
        "from speechclip_plus import compat\n"
        "compat.apply()\n"
        "from huggingface_hub import HfFolder\n"
        "assert HfFolder.get_token() is None\n"
        "HfFolder.save_token('hf_test_token')\n"
        "import os; from huggingface_hub import constants; assert os.path.isfile(constants.HF_TOKEN_PATH)\n"
        "assert HfFolder.get_token() == 'hf_test_token', HfFolder.get_token()\n"
        "HfFolder.delete_token()\n"
        "assert HfFolder.get_token() is None\n"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_TOKEN")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "hf" / "token").exists()


def test_torchaudio_load_falls_back_to_soundfile_and_repository_stand_in(tmp_path):
    import huggingface_hub
    import numpy as np
    import soundfile as sf
    import torchaudio

    from speechclip_plus import compat

    compat.apply()
    tone = (0.3 * np.sin(np.arange(8000) / 10)).astype("float32")
    sf.write(tmp_path / "stereo.wav", np.stack([tone, -tone], 1), 8000, subtype="FLOAT")
    wav, rate = torchaudio.load(str(tmp_path / "stereo.wav"), frame_offset=100, num_frames=400)
    assert rate == 8000 and tuple(wav.shape) == (2, 400)
    assert np.allclose(wav[0].numpy(), tone[100:500]) and np.allclose(wav[1].numpy(), -tone[100:500])
    with pytest.raises(RuntimeError, match="push-to-Hub"):
        huggingface_hub.Repository("x")


def test_catalyst_sampler_stand_in_lets_s3prl_keyword_spotting_import():
    """s3prl's KS expert imports catalyst's DistributedSamplerWrapper; catalyst does not install with current
    pip, so compat provides that one class when catalyst is absent."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("catalyst")
        pytest.skip("catalyst is installed here: the stand-in is not used")
    except PackageNotFoundError:
        pass
    with_apply = run_python(
        "from speechclip_plus import compat\n"
        "compat.apply()\n"
        "import s3prl.downstream.speech_commands.expert as ks\n"
        "assert ks.DistributedSamplerWrapper is compat.DistributedSamplerWrapper\n"
        "print('ok')"
    )
    assert with_apply.returncode == 0, with_apply.stderr[-2000:]
    assert with_apply.stdout.strip().endswith("ok")


def test_distributed_sampler_wrapper_splits_one_draw_over_the_ranks():
    from torch.utils.data import Sampler

    class Draws(Sampler):
        """A fresh random draw (with repeats) on every pass, like WeightedRandomSampler."""

        def __init__(self, n):
            self.n, self.passes = n, 0

        def __len__(self):
            return self.n

        def __iter__(self):
            self.passes += 1
            g = torch.Generator().manual_seed(self.passes)
            return iter(torch.randint(0, 100, (self.n,), generator=g).tolist())

    n = 12
    first_draw = list(Draws(n))
    shares = []
    for rank in range(3):
        wrapper = compat.DistributedSamplerWrapper(Draws(n), num_replicas=3, rank=rank, seed=5)
        wrapper.set_epoch(2)
        shares.append(list(wrapper))
        assert len(shares[-1]) == len(wrapper) == 4
    # the ranks split one draw: together they yield exactly its indices (shuffled by seed and epoch)
    assert sorted(sum(shares, [])) == sorted(first_draw) and sum(shares, []) != first_draw
    again = compat.DistributedSamplerWrapper(Draws(n), num_replicas=3, rank=0, seed=5)
    again.set_epoch(2)
    assert list(again) == shares[0]  # same seed, epoch and draw: the same share
    # unshuffled, 11 indices over 2 ranks: positions 1, 3, ..., 9 and the padding repeats position 0
    odd = compat.DistributedSamplerWrapper(Draws(11), num_replicas=2, rank=1, shuffle=False)
    draw11 = list(Draws(11))
    assert list(odd) == draw11[1::2] + draw11[:1]
