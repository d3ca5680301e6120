"""The entry point of every command (`python -m iics_fast.<command>`): a ValueError is the
user's mistake, printed as one line (by rank 0 alone under torchrun) with exit status 2."""
from __future__ import annotations

import os
import sys


def run(main, interrupted: str | None = None) -> None:
    """Call `main()`; a ValueError becomes `error: ...` on stderr and exit status 2, Ctrl-C a
    line (with the `interrupted` hint: how to continue) and exit status 130."""
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank has the message
    try:
        main()
    except ValueError as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if main_rank:
            print("interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        sys.exit(130)
