"""Write deploy/seccomp/poise-sandbox.json, the container seccomp profile of the services that run candidate
code, from poise.sandbox.container_seccomp_profile (docs/sandbox.md, In containers). tests/test_deploy.py checks
that the committed file is what this writes.

    python scripts/seccomp_profile.py
"""

from __future__ import annotations

import json
from pathlib import Path

from poise.sandbox import SECCOMP_PROFILE_PATH, container_seccomp_profile

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / SECCOMP_PROFILE_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(container_seccomp_profile(), indent=2) + "\n")
    print(f"wrote {path}")
