"""The registry: method names -> Method classes (minilars/methods/base.py).

A method module defines one Method subclass and decorates it with @register;
minilars/methods/__init__.py imports the modules, which fixes the order in which
commands list them. Everything else asks the registry: `method_class("lora")`,
`registered()`, `method_options()` for the CLI, `study_runs()` for the study,
`method_for_adapter(...)` for PEFT import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method, MethodOption, StudyRun

REGISTRY: dict[str, type["Method"]] = {}  # name -> class, in registration order


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no name to register it under")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered already ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy one put the registry back)."""
    REGISTRY.pop(name, None)


def registered(trains: bool | None = None) -> tuple[str, ...]:
    """Method names in registration order; trains=True: only those where something trains."""
    return tuple(name for name, cls in REGISTRY.items() if trains is None or cls.trains == trains)


def method_class(name: str) -> type["Method"]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}") from None


def method_options(names: tuple[str, ...] | None = None) -> list["MethodOption"]:
    """The options of the given methods (default: all registered), one per name in
    order of first appearance. An option several methods read (rank, targets) is one
    flag: its type and default must agree; each method's `note` is appended to the help."""
    merged: dict[str, MethodOption] = {}
    notes: dict[str, list[str]] = {}
    for name in names if names is not None else registered():
        for option in method_class(name).options:
            first = merged.setdefault(option.name, option)
            if (first.type, first.default) != (option.type, option.default):
                raise ValueError(f"option {option.name!r}: method {name!r} gives it type {option.type} and default "
                                 f"{option.default!r}, another method {first.type} and {first.default!r}")
            if option.note:
                notes.setdefault(option.name, []).append(f"{name}: {option.note}")
    return [o.with_help(f"{o.help} ({'; '.join(notes[o.name])})" if o.name in notes else o.help)
            for o in merged.values()]


def study_runs() -> dict[str, "StudyRun"]:
    """Every registered method's `minilars study` configurations, by run name."""
    runs: dict[str, StudyRun] = {}
    for cls in REGISTRY.values():
        runs.update(cls.study_runs())
    return runs


def method_for_adapter(peft_type: str | None, recorded: str | None) -> type["Method"]:
    """The method that loads a PEFT adapter of `peft_type`: the one minilars_adapter.json
    recorded (`recorded`) when it writes that type, else the type's own method (its
    `peft_default`: LoRA for LORA, IA3 for IA3). ValueError when none reads it."""
    readers = [cls for cls in REGISTRY.values() if cls.peft_type is not None and cls.peft_type == peft_type]
    for cls in readers:
        if cls.name == recorded:
            return cls
    for cls in readers:
        if cls.peft_default:
            return cls
    types = dict.fromkeys(cls.peft_type for cls in REGISTRY.values() if cls.peft_default and cls.peft_type)
    raise ValueError(f"peft_type {peft_type!r} is not supported ({', '.join(types)})")
