"""A real cache to damage: a small Llama-layout checkpoint analyzed and aligned (rank RANK) once
per module, and `copy` of it per test.

Imported by the cache audits' modules (`from cache_fixtures import ...`); the fixtures `llama`
and `template` become fixtures of every module that imports `llama_fixture` and
`template_fixture` (the way train_fixtures shares its own).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from svd_probe.alignment import align
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.store import SpectraCache, SpectraOptions
from svd_probe.results import CacheQuery, cache_repo, load_analysis
from svd_probe.testing.layouts import write_layout

RANK = 4


@pytest.fixture(scope="module", name="llama")
def llama_fixture(tmp_path_factory) -> Path:
    return write_layout(tmp_path_factory.mktemp("ck") / "llama", "llama")


@pytest.fixture(scope="module", name="template")
def template_fixture(llama, tmp_path_factory) -> Path:
    """Both layers of `llama` analyzed and aligned (rank RANK) once; tests damage copies."""
    root = tmp_path_factory.mktemp("template") / "cache"
    analyze(AnalyzeJob(model=str(llama), cache_dir=root, device="cpu"))
    align(str(llama), rank=RANK, cache_dir=root, device="cpu")
    return root


def copy(template: Path, tmp_path: Path, llama: Path) -> SpectraCache:
    """A copy of the template cache whose root is tmp_path / "cache"."""
    root = tmp_path / "cache"
    shutil.copytree(template, root)
    a = load_analysis(CacheQuery(str(llama), cache_dir=root))
    return SpectraCache(root, cache_repo(a.ref), a.commit, SpectraOptions())
