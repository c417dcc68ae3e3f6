"""Command-line entry points, each ``python -m speechclip_plus.bin.<tool> --help`` with a ``main(argv)``.

They parse arguments, call the library and map its errors to a message and a non-zero exit code; the logic
lives in the library packages.
"""
