"""The README's environment-variable table, generated from ``jitfreeze.config.ENV_VARS``.

    python scripts/env_table.py                   # print the table
    python scripts/env_table.py --check README.md # exit 1 if the README's table differs
    python scripts/env_table.py --write README.md # rewrite the README's table

The table sits between the markers ``<!-- env-table:start -->`` and ``<!-- env-table:end -->``.
Importing ``jitfreeze.config`` does not import torch.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "<!-- env-table:start -->"
END = "<!-- env-table:end -->"


def table() -> str:
    sys.path.insert(0, ROOT)
    from jitfreeze.config import ENV_VARS
    rows = ["| variable | meaning |", "|---|---|"]
    rows += ["| `%s` | %s |" % (name, text.replace("|", "\\|")) for name, text in ENV_VARS.items()]
    return "\n".join(rows) + "\n"


def split(text: str, path: str) -> tuple[str, str, str]:
    """(before the start marker, the table between the markers, from the end marker on)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: expected one {START} ... {END} pair")
    head, rest = text.split(START, 1)
    body, tail = rest.split(END, 1)
    return head + START + "\n", body.strip("\n") + "\n", END + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="README", help="exit 1 if README's table differs from ENV_VARS")
    group.add_argument("--write", metavar="README", nargs="?", const=os.path.join(ROOT, "README.md"),
                       help="rewrite README's table (default: the repository's README.md)")
    args = p.parse_args(argv)
    want = table()
    path = args.check or args.write
    if path is None:
        sys.stdout.write(want)
        return 0
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, have, tail = split(text, path)
    if args.check:
        if have == want:
            return 0
        sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                                   f"{path} (env table)", "jitfreeze.config.ENV_VARS"))
        print(f"{path}: the environment-variable table differs from jitfreeze.config.ENV_VARS; "
              f"run: python scripts/env_table.py --write {path}", file=sys.stderr)
        return 1
    if have != want:
        with open(path, "w", encoding="utf-8") as f:
            f.write(head + want + tail)
        print(f"rewrote the environment-variable table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
