"""Diagnostic child for the sandbox tests (tests/test_sandbox.py); not used in production.

Started through poise.sandbox.run_sandboxed like any sandboxed child: after enter_sandbox() it executes the
Python snippet of its `ProbePayload` and reports, as its `ProbeReport` (poise/contracts.py), the isolation
notes, whether the snippet raised (and with which errno) and the value the snippet left in the variable
`result`.
"""

from __future__ import annotations

import json

from poise.contracts import ProbePayload, ProbeReport
from poise.sandbox import emit_result, enter_sandbox


def main() -> None:
    payload, notes = enter_sandbox(ProbePayload)
    scope: dict = {"payload": payload.model_dump(mode="json")}
    report = ProbeReport(notes=notes)
    try:
        exec(compile(payload.code, "<probe>", "exec"), scope)  # noqa: S102 - the point of this module
    except BaseException as err:  # noqa: BLE001 - MemoryError, SystemExit, anything: report it
        report = ProbeReport(notes=notes, raised=type(err).__name__, errno=getattr(err, "errno", None),
                             message=str(err)[:500])
    report.result = json.loads(json.dumps(scope.get("result"), default=repr))
    emit_result(report)


if __name__ == "__main__":
    main()
