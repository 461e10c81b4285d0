"""``python -m genie_dg.toy``: optimizer paths on a 2-D multi-domain loss (see genie_dg.diagnostics.toy)."""

from genie_dg.diagnostics.toy import main

if __name__ == "__main__":
    raise SystemExit(main())
