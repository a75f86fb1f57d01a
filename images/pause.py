#!/usr/bin/env python3
"""Writes the test node's pause image (localhost/pause:3.2): Debian's catatonit as the pod's
init process, run as `/pause -P` (pause mode). Usage: pause.py OUT.tar"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import assemble  # noqa: E402

catatonit = shutil.which("catatonit") or sys.exit("pause: catatonit is not installed (apt-get install catatonit)")
config = {"Env": ["PATH=/"], "User": "", "Entrypoint": ["/pause", "-P"], "Cmd": None, "WorkingDir": "/", "ExposedPorts": {}}
assemble.write(config, {"/pause": catatonit}, "localhost/pause:3.2", sys.argv[1])
