"""The one atomic writer (``speechclip_plus.io``) and the one Kaldi ark/scp writer (``data.kaldi_ark``)."""
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from speechclip_plus.data.datadir import DataError
from speechclip_plus.data.kaldi_ark import EmbeddingScp, write_ark_scp
from speechclip_plus.io import atomic_path, atomic_write_text, remove_stale_temps, temp_path_for


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_replaced_file_keeps_its_permissions_unless_mode_is_given(tmp_path):
    target = tmp_path / "RESULTS.md"
    atomic_write_text(target, "one")
    os.chmod(target, 0o640)
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and _mode(target) == 0o640
    with atomic_path(target, mode=0o755) as tmp:
        Path(tmp).write_text("three")
    assert target.read_text() == "three" and _mode(target) == 0o755


def test_temporary_names_are_the_ones_the_stale_cleanup_removes(tmp_path):
    """A writer killed mid-write leaves a ``temp_path_for`` name; ``remove_stale_temps`` recognises it once its
    process is gone (here: a pid that cannot exist), and leaves a live writer's file alone."""
    final = tmp_path / "img_embed.ark"
    dead = Path(temp_path_for(final).replace(f"-{os.getpid()}-", "-999999999-"))
    live = Path(temp_path_for(final))
    for p in (dead, live):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [str(dead)]
    assert live.exists() and not dead.exists()


def _items(n: int, dim: int = 3):
    rng = np.random.default_rng(0)
    return [(f"utt{i}", rng.standard_normal(dim).astype(np.float32)) for i in range(n)]


def test_ark_scp_pair_round_trips_sorted_by_key(tmp_path):
    items = _items(4)[::-1] + [("a-b", np.ones((2, 3)))]  # unsorted, and a matrix
    scp, n = write_ark_scp(tmp_path / "out", "embed", iter(items))
    assert n == 5 and scp == str(tmp_path / "out" / "embed.scp")
    keys = [line.split()[0] for line in Path(scp).read_text().splitlines()]
    assert keys == ["a-b", "utt0", "utt1", "utt2", "utt3"]
    table = EmbeddingScp(scp)
    for key, arr in items:
        np.testing.assert_array_equal(table[key], np.asarray(arr, dtype=np.float32))
    assert sorted(os.listdir(tmp_path / "out")) == ["embed.ark", "embed.scp"]


def test_ark_scp_failure_keeps_the_previous_pair_and_no_temporary_file(tmp_path):
    scp, _ = write_ark_scp(tmp_path, "embed", _items(2))
    before = {p: (tmp_path / p).read_bytes() for p in ("embed.ark", "embed.scp")}

    def failing():
        yield from _items(3)
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        write_ark_scp(tmp_path, "embed", failing())
    with pytest.raises(DataError, match="key utt0 written twice"):
        write_ark_scp(tmp_path, "embed", _items(2) + _items(1))
    with pytest.raises(DataError, match="bad key 'a b'"):
        write_ark_scp(tmp_path, "embed", [("a b", np.zeros(3))])
    assert {p: (tmp_path / p).read_bytes() for p in ("embed.ark", "embed.scp")} == before
    assert sorted(os.listdir(tmp_path)) == ["embed.ark", "embed.scp"]
