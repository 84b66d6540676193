"""The `mailer` command as installed ([project.scripts]) and as `python -m mailer`."""

import gc


def run() -> None:
    # Start-up makes ~110,000 objects that live as long as the process (modules, classes,
    # functions, compiled templates), and the cyclic collector walks them again and again
    # while they are made: ~45 ms of a 0.7 s start (bench/README.md). The command turns it
    # back on when its start-up is over (cli/__init__.py; `send` after checking its campaign,
    # cli/send.py).
    gc.disable()
    from .cli import main

    main()
