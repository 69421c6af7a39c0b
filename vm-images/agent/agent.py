#!/usr/bin/env python3
"""Shoal guest agent: PID 1 of the guest. The code is in supervisor.py (see its docstring and
docs/agent-protocol.md); this entry stays small because a script run as __main__ is compiled at
every start, while an imported module uses the byte-code compiled when the image was built.

    agent.py                                     in the guest
    agent.py --fd N --data-dir DIR --user none   host tests (see --help)
"""

import supervisor

if __name__ == "__main__":
    supervisor.main()
