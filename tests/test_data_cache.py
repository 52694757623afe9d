"""scripts/pretrain_pfam.sh's data cache (megatron_protein.data.cache): keyed on what the data is made from, used only
when complete."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from pfam_fixtures import SAMPLE_FASTA

from megatron_protein.data import cache
from megatron_protein.data.indexed_dataset import MMapIndexedDataset
from megatron_protein.utils.errors import ConfigError


def _small_input(path, records=400):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(SAMPLE_FASTA) as src, open(path, "w") as dst:
        count = 0
        for line in src:
            if line.startswith(">"):
                count += 1
                if count > records:
                    break
            dst.write(line)
    return path


def test_same_name_in_another_directory_or_changed_content_gets_another_cache(tmp_path):
    v1 = _small_input(str(tmp_path / "v1" / "pfam.fasta"))
    v2 = _small_input(str(tmp_path / "v2" / "pfam.fasta"))
    root = str(tmp_path / "data")
    key1, _ = cache.cache_key(v1, "0.9,0.05,0.05", 1234, "iupac")
    key2, _ = cache.cache_key(v2, "0.9,0.05,0.05", 1234, "iupac")
    assert key1 != key2 and cache.cache_prefix(root, v1, key1) != cache.cache_prefix(root, v2, key2)
    assert os.path.basename(cache.cache_prefix(root, v1, key1)) == "pfam"
    assert key1 != cache.cache_key(v1, "0.8,0.1,0.1", 1234, "iupac")[0]
    assert key1 != cache.cache_key(v1, "0.9,0.05,0.05", 7, "iupac")[0]
    assert key1 != cache.cache_key(v1, "0.9,0.05,0.05", 1234, "sentencepiece")[0]
    link = str(tmp_path / "link.fasta")
    os.symlink(v1, link)
    assert cache.cache_key(link, "0.9,0.05,0.05", 1234, "iupac")[0] == key1  # the real path counts
    time.sleep(0.01)
    with open(v1, "a") as f:
        f.write(">extra\nMKV\n")
    assert cache.cache_key(v1, "0.9,0.05,0.05", 1234, "iupac")[0] != key1


def test_a_half_written_cache_is_prepared_again_and_a_complete_one_reused(tmp_path, caplog):
    source = _small_input(str(tmp_path / "in" / "pfam.fasta"))
    root = str(tmp_path / "data")
    key, _ = cache.cache_key(source, "0.9,0.05,0.05", 1234, "iupac")
    prefix = cache.cache_prefix(root, source, key)
    # What a preprocessing killed after its first output leaves: PREFIX_train and nothing else, no stamp.
    from megatron_protein.data.indexed_dataset import make_dataset
    make_dataset(prefix + "_train", [[5, 6, 7]])
    assert not cache.is_complete(prefix, key)
    assert cache.prepare(source, root, progress=False) == prefix
    assert cache.is_complete(prefix, key)
    counts = [len(MMapIndexedDataset(f"{prefix}_{s}")) for s in ("train", "valid", "test")]
    assert sum(counts) == 400 and counts[0] > 300
    stamp_time = os.path.getmtime(os.path.join(os.path.dirname(prefix), cache.STAMP))
    with caplog.at_level("INFO", logger="megatron_protein.data.cache"):
        assert cache.prepare(source, root, progress=False) == prefix
    assert "using the preprocessed data" in caplog.text
    assert os.path.getmtime(os.path.join(os.path.dirname(prefix), cache.STAMP)) == stamp_time


def test_other_nodes_wait_for_the_stamp(tmp_path):
    source = _small_input(str(tmp_path / "in" / "pfam.fasta"), records=50)
    with pytest.raises(ConfigError, match=r"COMPLETE: the preprocessed data of .* did not appear within 0\.2 s"):
        cache.prepare(source, str(tmp_path / "data"), split=None, wait_seconds=0.2, progress=False)
    prefix = cache.prepare(source, str(tmp_path / "data"), split=None, progress=False)
    assert cache.prepare(source, str(tmp_path / "data"), split=None, wait_seconds=0.2, progress=False) == prefix
    shutil.rmtree(tmp_path / "data")
