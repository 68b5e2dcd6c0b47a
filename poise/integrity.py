"""Tamper evidence for candidate code in a sandboxed harness (docs/sandbox.md, "Integrity of rewards and records").

The candidate runs in the harness's own process, so nothing in that process is out of its reach; what the harness
can do is keep what it reports away from the candidate's ordinary means and notice when trusted state changed:

- inputs: `poise.algorithm.run_advantages` / `run_policy_loss` give the candidate copies of every input tensor and
  fail a call that wrote into one (`Tampering`);
- rewards and records: `poise.testbed.training.train` computes what it logs of a step before candidate code sees
  the step, logs those values, and fails the run when its own tensors changed by the end of the step;
- trusted code: `TrustedState` records, before any candidate code runs, each trusted module's object in
  `sys.modules` and the functions, classes and constants it binds (with each Python function's code), the Python
  threads alive and torch's global modes and hooks; `CandidateGuard` checks that record after the candidate's
  import and after every call (the harness once more before it reports), so a grader replaced through
  `sys.modules` or monkeypatched fails the node with a reason naming it;
- where it was: the guard prints a `PhaseEvent` before candidate code runs and when it returns, so the parent can
  tell an exit at import from one in the middle of a call (poise/sandbox.py `SandboxResult.failure_reason`).

Limits: this is evidence, not a boundary. Candidate code that targets the harness itself (reaching its objects
through `gc` or frames, patching this module's checks, printing a forged result through poise.sandbox's own
protocol channel and exiting) can still forge what the child reports. That is why a training child's numbers
are used for diagnosis and never for ranking: evaluation runs in its own process on the checkpoint's weights.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

from poise.algorithm import REQUIRED_FUNCTIONS, Tampering, load_candidate

TRUSTED_PACKAGES = ("poise", "trainer", "implementer", "proposer")  # every module of these is trusted code
# Library modules whose functions compute what the harness grades and logs (tensor maths, regexes, builtins).
LIBRARY_MODULES = ("builtins", "math", "random", "re", "json", "torch", "torch.nn.functional",
                   "torch.nn.utils.clip_grad")
LIBRARY_CLASSES = (("torch", "Tensor"), ("torch.nn", "Module"), ("random", "Random"))
HARNESS_PHASE = "back in the harness"


def _trusted_module_name(name: str) -> bool:
    return name in LIBRARY_MODULES or any(name == p or name.startswith(p + ".") for p in TRUSTED_PACKAGES)


def _watched_value(name: str, value: Any) -> bool:
    """Module globals worth a check: what code calls, and public constants (never private state that trusted code
    rebinds, such as a lazily created default `_DEFAULT`)."""
    if name.startswith("__") and name.endswith("__"):
        return False
    return callable(value) or isinstance(value, types.ModuleType | re.Pattern) or (
        name.isupper() and not name.startswith("_"))


def _code_of(value: Any) -> tuple[Any, Any, Any] | None:
    """A Python function's code, defaults and keyword defaults (what `f.__code__ = ...` would replace)."""
    function = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    if isinstance(function, property):
        function = function.fget
    if isinstance(function, types.FunctionType):
        return function.__code__, function.__defaults__, function.__kwdefaults__
    return None


class TrustedState:
    """What trusted code is, recorded before any candidate code runs: `changes()` lists what differs since.

    Recorded: every loaded module of TRUSTED_PACKAGES and LIBRARY_MODULES (its object in sys.modules, and the
    callables, modules, patterns and UPPER_CASE constants it binds), the methods of every class those trusted
    packages define and of LIBRARY_CLASSES (and any attribute added later over an inherited one), the Python
    threads alive, and torch's global modes and hooks. A trusted-package module that appears later must come
    from a file of that package (a module made up and put into sys.modules does not)."""

    def __init__(self) -> None:
        self.modules: dict[str, tuple[types.ModuleType, dict[str, tuple[Any, Any]]]] = {}
        self.classes: dict[str, tuple[type, dict[str, tuple[Any, Any]], frozenset[str]]] = {}
        for name, module in list(sys.modules.items()):
            if not isinstance(module, types.ModuleType) or not _trusted_module_name(name):
                continue
            namespace = vars(module)
            self.modules[name] = (module, {key: (value, _code_of(value)) for key, value in namespace.items()
                                           if _watched_value(key, value)})
            if name in LIBRARY_MODULES:
                continue
            for value in namespace.values():
                if isinstance(value, type) and value.__module__ == name:
                    self._record_class(value)
        for module_name, class_name in LIBRARY_CLASSES:
            cls = getattr(sys.modules.get(module_name), class_name, None)
            if isinstance(cls, type):
                self._record_class(cls)
        self.loaded = frozenset(sys.modules)
        self.threads = frozenset(map(id, threading.enumerate()))
        self.torch_state = _torch_global_state()

    def _record_class(self, cls: type) -> None:
        entries = {key: (value, _code_of(value)) for key, value in vars(cls).items()
                   if callable(value) or _code_of(value) is not None}
        self.classes[f"{cls.__module__}.{cls.__qualname__}"] = (cls, entries, frozenset(vars(cls)))

    def changes(self) -> list[str]:
        """What changed since the record, one phrase each ("poise.testbed.tasks.grade was replaced")."""
        found: list[str] = []
        for name, (module, entries) in self.modules.items():
            if name not in sys.modules:
                found.append(f"the trusted module {name} was removed from sys.modules")
            elif sys.modules[name] is not module:
                found.append(f"the trusted module {name} was replaced in sys.modules")
            found += _entry_changes(name, vars(module), entries)
        for qualname, (cls, entries, keys) in self.classes.items():
            namespace = vars(cls)
            found += _entry_changes(qualname, namespace, entries)
            # An attribute added over an inherited one changes what the class does (libraries add new ones freely:
            # transformers adds nn.Module.smart_apply when a model loads).
            found += [f"{qualname}.{key} was added over the inherited one" for key in namespace.keys() - keys
                      if any(key in vars(base) for base in cls.__mro__[1:])]
        for name in sys.modules.keys() - self.loaded:
            if _trusted_module_name(name) and not _genuine(name, sys.modules.get(name)):
                found.append(f"sys.modules[{name!r}] was set to something that is not the trusted module")
        now = _torch_global_state()
        found += [f"{what} went from {count} to {now.get(what)}" for what, count in self.torch_state.items()
                  if now.get(what) != count]
        started = [thread.name for thread in threading.enumerate() if id(thread) not in self.threads]
        if started:
            found.append(f"a thread was started ({', '.join(started[:3])})")  # it would run between the checks
        return found

    def check(self, during: str) -> None:
        """Tampering naming the first change (and how many more) found after `during`."""
        found = self.changes()
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise Tampering(f"tampering: {found[0]} while {during}{more}; a candidate computes its outputs and "
                            "must not change the harness's code or state")


def _entry_changes(owner: str, namespace: Any, entries: dict[str, tuple[Any, Any]]) -> Iterable[str]:
    for key, (value, code) in entries.items():
        if key not in namespace:
            yield f"{owner}.{key} was deleted"
            continue
        current = namespace[key]
        if current is not value:
            yield f"{owner}.{key} was replaced"
        elif code is not None and not all(a is b for a, b in zip(_code_of(current) or (), code, strict=True)):
            yield f"the code of {owner}.{key} was replaced"


def _torch_global_state() -> dict[str, int]:
    """Counts of torch's global state through which code changes every operation or every model's output without
    replacing a function: torch function and dispatch modes entered, global module hooks registered."""
    found: dict[str, int] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        found["the torch function modes entered"] = torch._C._len_torch_function_stack()
    dispatch = sys.modules.get("torch.utils._python_dispatch")
    if dispatch is not None:
        found["the torch dispatch modes entered"] = len(dispatch._get_current_dispatch_mode_stack())
    hooks = sys.modules.get("torch.nn.modules.module")
    for name, value in sorted(vars(hooks).items()) if hooks is not None else ():
        if name.startswith("_global_") and name.endswith("hooks") and isinstance(value, dict):
            found[f"the global nn.Module hooks in {name}"] = len(value)
    return found


def _genuine(name: str, module: Any) -> bool:
    """A trusted-package module imported after the record: a real module loaded from its package's files."""
    if not isinstance(module, types.ModuleType):
        return False
    spec = getattr(module, "__spec__", None)
    root = sys.modules.get(name.split(".")[0])
    paths = list(getattr(root, "__path__", []) or [])
    origin = getattr(spec, "origin", None) or ""
    return spec is not None and spec.name == name and any(origin.startswith(str(path)) for path in paths)


class CandidateGuard:
    """Loads and runs a candidate under watch. Create it after the harness's trusted imports and before any
    candidate code runs: `load` imports the candidate and returns it with its interface functions wrapped, so
    that every call reports its phase (`on_phase`, a `PhaseEvent.phase`) and is followed by a check of the
    trusted state (`Tampering` when it changed)."""

    def __init__(self, on_phase: Callable[[str], None] | None = None) -> None:
        self.trusted = TrustedState()
        self.on_phase = on_phase or (lambda phase: None)

    def load(self, source: str, name: str = "candidate") -> types.ModuleType:
        """poise.algorithm.load_candidate under watch; the module returned is a copy whose interface functions
        are guarded (the candidate's own functions still see its original module)."""
        self.on_phase("importing the candidate")
        module = load_candidate(source, name)  # a CandidateError leaves the phase at the import, where it was
        self.trusted.check("importing the candidate")
        self.on_phase(HARNESS_PHASE)
        guarded = types.ModuleType(module.__name__)
        guarded.__dict__.update(vars(module))
        for function in REQUIRED_FUNCTIONS:
            if callable(getattr(module, function, None)):
                setattr(guarded, function, self._guarded(getattr(module, function), function))
        return guarded

    def _guarded(self, function: Callable, name: str) -> Callable:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.on_phase(f"calling {name}")
            try:
                return function(*args, **kwargs)
            finally:  # Tampering found here wins over the call's own error: it is the reason that matters
                self.trusted.check(f"calling {name}")
                self.on_phase(HARNESS_PHASE)

        return call
