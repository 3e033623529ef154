"""The README documents every environment variable and the public API; the docs site builds."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import jitfreeze
from jitfreeze.config import ENV_VARS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_readme_lists_every_env_var():
    readme = read("README.md")
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert missing == []


def test_readme_env_table_is_generated_from_env_vars():
    """The table between the env-table markers is exactly scripts/env_table.py's output."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "env_table.py"), "--check", README],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_vars_are_the_ones_config_reads():
    """ENV_VARS names every JITFREEZE_* variable config.py reads, and nothing else."""
    source = read(os.path.join("jitfreeze", "config.py")).split("ENV_VARS = {", 1)[1].split("\n}\n", 1)[1]
    assert set(re.findall(r'"(JITFREEZE_[A-Z_]+)"', source)) == set(ENV_VARS)


def test_readme_is_short_and_keeps_its_contract_section():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 210
    assert "\n## What jitfreeze checks on every call, and what it does not\n" in readme


def test_readme_links_into_docs_resolve():
    """Relative links in the README (as GitHub resolves them) name files that exist, and
    anchors (into the README itself or a docs/ page) name headings that exist."""
    readme = read("README.md")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        path = path or "README.md"
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and path.endswith(".md"):
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", read(path), flags=re.M)}
            if anchor not in slugs:
                bad.append(target)
    assert bad == []


def test_dated_results_live_in_docs_once():
    """The latest run's tables are in docs/performance.md only (benchmarks/README.md links there)."""
    marker = "\n<!-- benchmarks:start -->\n"
    assert marker in read(os.path.join("docs", "performance.md"))
    assert marker not in read(os.path.join("benchmarks", "README.md"))
    assert "docs/performance.md" in read(os.path.join("benchmarks", "README.md"))
    assert "#### Cold first call" not in read("README.md")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed "
                    "(requirements-dev.txt pins it; bash scripts/test.sh installs it)")
def test_docs_site_builds_strict(tmp_path):
    """mkdocs build --strict: a broken link, a missing anchor or a page outside the nav fails it."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "how-it-works" / "index.html").exists()


def test_public_api_is_small_and_exported():
    assert set(jitfreeze.__all__) == {"jitfreeze", "clear_cache", "CacheInfo", "JitFreezeFunction", "JitFreezeModule",
                                      "JitFreezeWarning", "JitFreezeError", "ParametersDiscardedError",
                                      "precompile", "PrecompileResult", "PrecompileReport", "__version__"}
    for name in jitfreeze.__all__:
        assert hasattr(jitfreeze, name)
