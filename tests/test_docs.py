"""The README documents every environment variable and the public API."""

import os

import jitfreeze
from jitfreeze.config import ENV_VARS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_lists_every_env_var():
    readme = open(os.path.join(ROOT, "README.md")).read()
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert missing == []


def test_public_api_is_small_and_exported():
    assert set(jitfreeze.__all__) == {"jitfreeze", "clear_cache", "CacheInfo", "JitFreezeFunction",
                                      "JitFreezeWarning", "JitFreezeError", "ParametersDiscardedError",
                                      "__version__"}
    for name in jitfreeze.__all__:
        assert hasattr(jitfreeze, name)
