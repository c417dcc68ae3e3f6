"""speechclip_plus: recipes, models and tools for SpeechCLIP+ (arXiv 2402.06959)."""
from setuptools import find_packages, setup

# Pins known to install and import together (torch wheels resolve to other builds unpinned).
install_requires = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "torchaudio==2.11.0",
    "open_clip_torch==3.3.0",
    "s3prl==0.4.18",
    "huggingface_hub==2.4.0",
    "sentencepiece",
    "kaldiio",
    "pyyaml",
    "tensorboard",
    "tensorboardX",
    "soundfile",
    "tqdm",
    "matplotlib",
    "numpy",
    "Pillow",
]

TOOLS = ["train", "score", "export", "extract", "embed_images", "make_vocab", "format_audio", "validate_data",
         "import_reference"]

setup(
    name="speechclip_plus",
    version="0.1.0",
    description="Visually grounded speech representations: SpeechCLIP and SpeechCLIP+ recipes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["speechclip_plus", "speechclip_plus.*"]),
    package_data={"speechclip_plus": ["conf/*.yaml", "models/clip_configs/*.json"]},
    install_requires=install_requires,
    extras_require={"test": ["pytest"], "bench": ["torch-cif==0.2.0"]},
    entry_points={
        "console_scripts": [f"speechclip-{t.replace('_', '-')}=speechclip_plus.bin.{t}:main" for t in TOOLS]
        + ["speechclip-superb=speechclip_plus.superb.__main__:main"]
    },
)
