"""Compare two archive dumps of bench/scripts/dump_archive.py node by node: proposals, parents, status, scores,
curves and reflections must agree; the compiled code is compared separately (its hash), since a refactor of the
code generator may change the text of a module without changing what it computes.

    python bench/scripts/compare_archives.py BEFORE.json AFTER.json
"""

import json
import sys


def main(before_path: str, after_path: str) -> int:
    before, after = json.load(open(before_path)), json.load(open(after_path))
    differences = []
    if [n["node_id"] for n in before] != [n["node_id"] for n in after]:
        differences.append(f"node ids {[n['node_id'] for n in before]} vs {[n['node_id'] for n in after]}")
    for old, new in zip(before, after, strict=False):
        differences += [f"{old['node_id']} {key}: {old[key]!r:.80} vs {new.get(key)!r:.80}"
                        for key in old if key != "code_sha" and old[key] != new.get(key)]
    code = sum(old["code_sha"] != new["code_sha"] for old, new in zip(before, after, strict=False))
    print(f"{len(before)} vs {len(after)} nodes: {len(differences)} differences in proposals, parents, status, "
          f"scores, curves and reflections; compiled code text differs on {code} node(s)")
    for line in differences:
        print("  " + line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
