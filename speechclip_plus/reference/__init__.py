"""Import the official SpeechCLIP / SpeechCLIP+ checkpoints (PyTorch Lightning files of the authors' code).

- ``checkpoint``: read such a file without running any of its code (allow-listed inert stand-ins).
- ``hparams``: translate the reference's hyper-parameters into this toolkit's config.
- ``weights``: map every reference state-dict key onto ``SpeechCLIP`` (or list it as ignored, with why).
- ``convert``: build the model, check the frozen HuBERT / CLIP copies, write a model file.
The command line is ``python -m speechclip_plus.bin.import_reference``.
"""
