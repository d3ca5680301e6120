"""The entry point of every command (`python -m iics_fast.<command>`): a ValueError is the
user's mistake, printed as one line (by rank 0 alone under torchrun) with exit status 2."""
import os
import sys


def run(main) -> None:
    """Call `main()`; a ValueError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except ValueError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the message
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
