"""Dump a run's archive as comparable JSON: per node the proposal, parents, status, code hash and scores."""
import hashlib
import json
import sqlite3
import sys

db = sqlite3.connect(sys.argv[1])
out = []
for (doc,) in db.execute("SELECT doc FROM nodes ORDER BY seq"):
    n = json.loads(doc)
    ev = n.get("evaluation") or {}
    out.append({
        "node_id": n["genealogy"]["node_id"], "parents": n["genealogy"]["parent_ids"], "status": n["status"],
        "name": n["proposal"]["name"], "mechanisms": n["proposal"]["mechanisms"],
        "code_sha": hashlib.sha256(((n.get("implementation") or {}).get("source") or "").encode()).hexdigest()[:12],
        "overall": ev.get("overall"), "suites": ev.get("suites"),
        "replicates": [r["overall"] for r in n.get("replicates", [])],
        "reward_curve": [s.get("reward_mean") for s in (n.get("trajectory") or {}).get("steps", [])],
        "diagnoses": (n.get("reflection") or {}).get("diagnoses"),
    })
json.dump(out, sys.stdout, indent=1, sort_keys=True)
