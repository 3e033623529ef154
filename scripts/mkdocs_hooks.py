"""mkdocs hook (mkdocs.yml: ``hooks:``): links from docs/ to files elsewhere in the repository.

The pages link to repository files outside ``docs/`` with relative paths that work on GitHub
(``../benchmarks/README.md``, ``../benchmarks/results/chart.png``). mkdocs only knows the files
under ``docs/`` and, with ``--strict``, fails on such links. This hook checks each one instead:
a target missing from the repository is a warning (so ``mkdocs build --strict`` fails); an image
that exists is copied into the site under ``_repo/`` and shown; a link to any other file becomes
the file's path as code text (the site has no copy of the repository to link to).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

log = logging.getLogger("mkdocs.hooks.repo_links")

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_IMAGE_EXT = (".png", ".svg", ".jpg", ".jpeg", ".gif")
_copies: dict[str, str] = {}


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs = os.path.abspath(config["docs_dir"])
    root = _root(config)
    page_dir = os.path.dirname(os.path.join(docs, page.file.src_path))
    depth = page.url.count("/") if config["use_directory_urls"] else page.file.src_uri.count("/")

    def fix(m):
        bang, text, target = m.groups()
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return m.group(0)
        path = target.split("#", 1)[0]
        full = os.path.normpath(os.path.join(page_dir, path))
        if full == docs or full.startswith(docs + os.sep) or not full.startswith(root + os.sep):
            return m.group(0)                   # mkdocs checks links inside docs/ itself
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        if not os.path.exists(full):
            log.warning("Doc file '%s' links to '%s', which is not in the repository", page.file.src_path, target)
            return m.group(0)
        if bang and full.lower().endswith(_IMAGE_EXT):
            _copies[rel] = full
            return f"<img alt=\"{text}\" src=\"{'../' * depth}_repo/{rel}\">"
        return f"`{rel}`" if text.strip("`") == rel else f"{text} (`{rel}` in the repository)"

    return _LINK.sub(fix, markdown)


def on_post_build(config, **kwargs):
    for rel, full in _copies.items():
        dest = os.path.join(config["site_dir"], "_repo", rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(full, dest)
