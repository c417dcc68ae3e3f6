"""``python -m speechclip_plus.superb <s3prl run_downstream options>`` (console script ``speechclip-superb``).

Runs s3prl's own ``run_downstream`` in this process after ``register()`` (compat shims, checkpoint loading,
our entries on ``s3prl.hub``). Every s3prl option works unchanged, e.g.
    python -m speechclip_plus.superb -m train -u speechclip_plus_local -k /abs/model.pt -d emotion \\
        -c /abs/emotion.yaml -p /abs/exp/er --device cpu
    python -m speechclip_plus.superb -m evaluate -e /abs/exp/er/states-20.ckpt --device cpu
Distributed runs: ``--local-rank N`` (what ``torch.distributed.launch`` passes today) becomes s3prl's
``--local_rank N``; under ``torchrun`` (no flag, ``LOCAL_RANK`` in the environment, ``WORLD_SIZE`` > 1) the
flag is added from the environment.
"""
from __future__ import annotations

import os
import sys
from typing import List, Mapping, Optional, Sequence


def rewrite_args(argv: Sequence[str], environ: Mapping[str, str]) -> List[str]:
    """``--local-rank[=]N`` -> ``--local_rank[=]N``; under torchrun add ``--local_rank $LOCAL_RANK``."""
    out: List[str] = []
    for arg in argv:
        if arg == "--local-rank":
            out.append("--local_rank")
        elif arg.startswith("--local-rank="):
            out.append("--local_rank=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    has_rank = any(a == "--local_rank" or a.startswith("--local_rank=") for a in out)
    world = environ.get("WORLD_SIZE", "1")
    if not has_rank and "LOCAL_RANK" in environ and world.isdigit() and int(world) > 1:
        out += ["--local_rank", environ["LOCAL_RANK"]]
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Register our upstream entries, then run ``s3prl.run_downstream.main()`` on ``argv`` (default sys.argv)."""
    from . import register

    args = sys.argv[1:] if argv is None else list(argv)
    register()
    from s3prl import run_downstream

    sys.argv = ["python -m speechclip_plus.superb"] + rewrite_args(args, os.environ)
    run_downstream.main()


if __name__ == "__main__":
    main()
