"""Run every benchmark in bench/ in turn, each in its own process, and print their tables (``make bench``).

A benchmark is a ``bench/*.py`` file with a ``__main__`` block (helpers such as ``cif_loop.py`` have none);
known ones run in ``ORDER``, others after them alphabetically. Each prints its table on stdout (shown once it
finishes) and, unless ``--no-write``, updates its own section of bench/RESULTS.md. Exit status 1 if any
benchmark fails or exceeds ``--timeout`` (``LONG`` ones: their own limit); the summary lists each one's status and
wall time. With the defaults the short ones took under 6 minutes on the project's loaded 2-core machine (budget:
10); ``data_stages`` (corpus scale, ``LONG``) takes longer on its own.

``--quick``: small sizes for a smoke test (about 5 minutes there); implies ``--no-write`` so quick figures never
replace the recorded ones.

``--device cpu|cuda``: passed to every benchmark that has a ``--device`` option (without it each picks the GPU when
CUDA is available). With ``cuda``, benchmarks without the option (CPU-only ones, such as the data stages) are
skipped and listed: they would take no GPU figure, and the GPU host's CPU figures are not the project machine's.
``bench/gpu.sh`` runs ``--device cuda``.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ("retrieval", "cif", "train_step", "dataload", "data_stages")
BUDGET_S = 600.0
# Corpus-scale benchmarks: their own time limit (seconds, instead of --timeout) and outside the budget.
LONG = {"data_stages": 2400.0}

# Options that shrink a benchmark for --quick, where it has no --quick of its own.
QUICK = {
    "retrieval": ["--n-speech", "5000", "--n-images", "1000", "--repeats", "2"],
    "cif": ["--budget", "0.3"],
}


def discover(directory: Path = HERE) -> List[str]:
    """Names of the benchmark scripts in ``directory`` (see the module docstring), in run order."""
    names = []
    for path in sorted(directory.glob("*.py")):
        if path.name == Path(__file__).name or path.name.startswith("_"):
            continue
        if "__name__ == \"__main__\"" in path.read_text(encoding="utf-8"):
            names.append(path.stem)
    known = [n for n in ORDER if n in names]
    return known + [n for n in names if n not in ORDER]


def takes_device(text: str) -> bool:
    """Whether a benchmark's source has the ``--device`` option (its own or ``_device.add_device_option``)."""
    return "\"--device\"" in text or "add_device_option(" in text


def options(name: str, quick: bool, no_write: bool, directory: Path = HERE, device: Optional[str] = None
            ) -> List[str]:
    """Command-line options for one benchmark: ``--device``, its quick settings and --no-write, where it has
    them (see the module docstring)."""
    text = (directory / f"{name}.py").read_text(encoding="utf-8")
    opts: List[str] = []
    if device is not None and takes_device(text):
        opts += ["--device", device]
    if quick:
        opts += QUICK.get(name, ["--quick"] if "\"--quick\"" in text else [])
    if (quick or no_write) and "\"--no-write\"" in text and "--no-write" not in opts:
        opts.append("--no-write")
    return opts


def run(name: str, opts: List[str], timeout: float) -> Dict:
    """Run one benchmark; returns its status, seconds, stdout and the tail of its stderr.

    Past ``timeout`` the benchmark gets SIGINT (so its temporary directories are removed on the way out), and
    SIGKILL 15 s later if it is still running.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *opts], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        status = f"TIMEOUT (> {timeout:.0f} s)"
    return {"name": name, "status": status, "seconds": time.perf_counter() - t0, "stdout": out,
            "stderr_tail": "\n".join(err.strip().splitlines()[-30:])}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test); implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="benchmarks print only; RESULTS.md is not updated")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (names without .py)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per benchmark")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="passed to the benchmarks that take it (default: each picks the GPU when available)")
    args = ap.parse_args(argv)
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in args.only]

    skipped = []
    if args.device == "cuda":
        skipped = [n for n in names if not takes_device((HERE / f"{n}.py").read_text(encoding="utf-8"))]
        names = [n for n in names if n not in skipped]
        if skipped:
            print(f"skipped on --device cuda (CPU only, no --device option): {', '.join(skipped)}", flush=True)
    load = os.getloadavg()[0]
    print(f"running {len(names)} benchmark(s): {', '.join(names)} (load average {load:.2f}, "
          f"{os.cpu_count()} CPUs)", flush=True)
    results = []
    for name in names:
        opts = options(name, args.quick, args.no_write, device=args.device)
        print(f"\n=== {name} {' '.join(opts)}".rstrip(), flush=True)
        r = run(name, opts, max(args.timeout, LONG.get(name, 0.0)))
        results.append(r)
        print(r["stdout"].rstrip(), flush=True)
        if r["status"] != "ok":
            print(f"--- {name}: {r['status']}; last lines of its stderr:\n{r['stderr_tail']}", flush=True)
        print(f"=== {name}: {r['status']} in {r['seconds']:.0f} s", flush=True)

    total = sum(r["seconds"] for r in results)
    budgeted = sum(r["seconds"] for r in results if r["name"] not in LONG)
    print("\n| benchmark | status | seconds |\n|---|---|---:|")
    for r in results:
        print(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |")
    for name in skipped:
        print(f"| {name} | skipped (CPU only) | - |")
    print(f"| total | | {total:.0f} |")
    note = "" if budgeted <= BUDGET_S else f" (over the {BUDGET_S / 60:.0f}-minute budget of the short ones)"
    print(f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end{note}")
    failed = [r["name"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
