"""Register this machine with asv under a name, with what asv detects of it (os, arch, cpu,
number of CPUs, RAM), keeping any value already recorded for that name.

`asv machine --machine NAME --yes` records the name alone (asv keeps only the values that
differ from its detected ones), and the report's hardware section then has nothing to say.

    python scripts/asv_machine.py NAME
"""

from __future__ import annotations

import json
import sys

from asv.machine import Machine, MachineCollection


def register(name: str) -> dict[str, str]:
    """Save NAME's entry in ~/.asv-machine.json: detected values under recorded ones."""
    try:
        with open(MachineCollection.get_machine_file_path()) as f:
            known = json.load(f).get(name, {})
    except FileNotFoundError:
        known = {}
    info = {**Machine.get_defaults(), **{k: v for k, v in known.items() if v},
            "machine": name}
    MachineCollection.save(name, info)
    return info


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1]:
        sys.exit("usage: asv_machine.py NAME")
    print(register(sys.argv[1]))
