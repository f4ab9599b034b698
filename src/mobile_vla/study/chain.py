"""Several ``mobile-vla`` commands in one process, in order, stopping at the first failure.

A study cell trains and then evaluates; run as two processes, each pays the interpreter and
library start-up again (about 7 s on two cores). ``python -m mobile_vla.study.chain JSON`` takes
a JSON list of argument lists and runs them through the same CLI entry point.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from mobile_vla.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = json.loads(argv[0]) if len(argv) == 1 else None
    if not isinstance(commands, list) or not all(isinstance(c, list) for c in commands):
        print('usage: python -m mobile_vla.study.chain \'[["train", ...], ["eval", ...]]\'')
        return 2
    for i, args in enumerate(commands):
        if i:  # the first command's line is written by the caller
            print(f"$ mobile-vla {' '.join(args)}", flush=True)
        code = cli_main(args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
