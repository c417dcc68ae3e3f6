"""torch.hub entries of this repository.

    torch.hub.load("<repo dir>", "speechclip_plus", source="local", ckpt="/abs/model.pt")

Each entry returns the s3prl-style upstream expert of ``speechclip_plus.superb``: ``forward(list of 1-D
16 kHz waveforms) -> {"hidden_states": [...], "last_hidden_state": ...}``. ``ckpt`` is a model file written
by ``python -m speechclip_plus.bin.export`` (or ``bin.import_reference``): a path (``speechclip_plus_local``),
an http(s) URL (``speechclip_plus_url``), ``hf://ORG/NAME[@REVISION]`` on the Hugging Face Hub
(``speechclip_plus_hf``), or any of them (``speechclip_plus``).
"""
dependencies = ["torch"]

from speechclip_plus.superb.hubconf import (  # noqa: E402,F401
    speechclip_plus,
    speechclip_plus_hf,
    speechclip_plus_local,
    speechclip_plus_url,
)
