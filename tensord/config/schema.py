"""Each setting stated once: its kind (type and range), env var, Ollama alias, flag and doc.

A setting is a dataclass field whose metadata holds a :class:`Spec` (write it with
:func:`setting`). Everything else is derived from the specs, so a range or a variable name is
written in exactly one place:

- :func:`parse_section` validates a cluster-file object against a section class (types,
  ranges, unknown and missing keys), with the one-line messages of tensord/config/values.py;
- :func:`env_override` reads a setting's variable (``TENSORD_*`` first, then its Ollama alias);
- :func:`walk` lists every setting for the env var table (``ENV_VARS``) and the README's
  configuration tables (tensord/config/docs.py).

A :class:`Kind` parses one value from either source. The cluster file is JSON, so there numbers
and booleans must be JSON numbers and booleans, not strings; env vars and flags are always
strings and go through the same parser without that check.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from ..errors import ConfigError
from . import values as v

T = TypeVar("T")
S = TypeVar("S")

_SPEC = "tensord.setting"  # the metadata key a field's Spec is stored under


# --------------------------------------------------------------------------------------------
# Kinds: what a value may be, how it is read from the file and from env vars or flags, and the
# text that says what is accepted (in error messages and in the README alike).


class Kind(ABC, Generic[T]):
    @property
    @abstractmethod
    def accepted(self) -> str:
        """What is accepted, as errors and the README say it (``an integer in 4 KiB..64 MiB
        (bytes)``)."""

    @property
    def env_accepted(self) -> str:
        """What an env var or flag may say (the same, but never null)."""
        return self.accepted

    @property
    def unit(self) -> str | None:
        """``bytes``, ``seconds`` or ``milliseconds`` for a quantity."""
        return None

    @abstractmethod
    def from_json(self, where: str, value: object) -> T:
        """The value of a cluster-file key (a JSON value)."""

    def from_env(self, where: str, text: str) -> T:
        """The value of an env var or a flag (always a string)."""
        return self.from_json(where, text)


def _not_string(where: str, value: object, accepted: str) -> None:
    """In the JSON file, numbers and booleans are JSON numbers and booleans, not strings."""
    if isinstance(value, str):
        raise v.fail(where, value, f"{accepted} (a JSON value, not a string)")


@dataclass(frozen=True)
class Integer(Kind[int]):
    lo: int | None = None
    hi: int | None = None
    unit: str | None = None  # a field overriding Kind.unit

    @property
    def accepted(self) -> str:
        return v.int_accepted(self.lo, self.hi, self.unit)

    def from_json(self, where: str, value: object) -> int:
        _not_string(where, value, "an integer")
        return v.parse_int(where, value, self.lo, self.hi, self.unit)

    def from_env(self, where: str, text: str) -> int:
        return v.parse_int(where, text, self.lo, self.hi, self.unit)


@dataclass(frozen=True)
class Number(Kind[float]):
    lo: float = 0.0
    unit: str | None = None  # a field overriding Kind.unit

    @property
    def accepted(self) -> str:
        return v.float_accepted(self.lo, self.unit)

    def from_json(self, where: str, value: object) -> float:
        _not_string(where, value, "a number")
        return v.parse_float(where, value, self.lo, self.unit)

    def from_env(self, where: str, text: str) -> float:
        return v.parse_float(where, text, self.lo, self.unit)


@dataclass(frozen=True)
class Boolean(Kind[bool]):
    accepted = v.ACCEPTED_BOOL

    def from_json(self, where: str, value: object) -> bool:
        _not_string(where, value, v.ACCEPTED_BOOL)
        return v.parse_bool(where, value)

    def from_env(self, where: str, text: str) -> bool:
        return v.parse_bool(where, text)


@dataclass(frozen=True)
class Parsed(Kind[T]):
    """A string of some shape, read by the same parser from the file and from env vars."""

    what: str
    parse: Callable[[str, object], T]

    @property
    def accepted(self) -> str:
        return self.what

    def from_json(self, where: str, value: object) -> T:
        return self.parse(where, value)


TEXT = Parsed(v.ACCEPTED_STR, v.parse_str)
PATH = Parsed("a path", v.parse_path)
NODE_ID = Parsed(v.ACCEPTED_NODE_ID, v.parse_node_id)
URL = Parsed(v.ACCEPTED_URL, v.parse_url)


@dataclass(frozen=True)
class Choice(Kind[str]):
    choices: tuple[str, ...]

    @property
    def accepted(self) -> str:
        return v.choice_accepted(self.choices)

    def from_json(self, where: str, value: object) -> str:
        return v.parse_choice(where, value, self.choices)


@dataclass(frozen=True)
class Address(Kind[v.HostPort]):
    """``host:port``. Port 0 (an ephemeral port: tests, one-off runs) is accepted from env vars
    and flags, which are one node's own, but not from the cluster file every node shares."""

    accepted = v.ACCEPTED_HOSTPORT

    def from_json(self, where: str, value: object) -> v.HostPort:
        return v.parse_hostport(where, value)

    def from_env(self, where: str, text: str) -> v.HostPort:
        return v.parse_hostport(where, text, allow_port_zero=True)


@dataclass(frozen=True)
class Nullable(Kind[T | None]):
    """``null`` in the file means "the default"; an env var cannot say null (empty is unset)."""

    inner: Kind[T]

    @property
    def accepted(self) -> str:
        return f"{self.inner.accepted}, or null"

    @property
    def env_accepted(self) -> str:
        return self.inner.env_accepted

    @property
    def unit(self) -> str | None:
        return self.inner.unit

    def from_json(self, where: str, value: object) -> T | None:
        return None if value is None else self.inner.from_json(where, value)

    def from_env(self, where: str, text: str) -> T | None:
        return self.inner.from_env(where, text)


@dataclass(frozen=True)
class Section(Kind[S]):
    """A JSON object whose keys are the settings of ``cls``."""

    cls: type[S]
    accepted = "a JSON object"

    def from_json(self, where: str, value: object) -> S:
        return parse_section(where, value, self.cls)

    def from_env(self, where: str, text: str) -> S:
        raise TypeError(f"{where}: a section is not read from an env var")


@dataclass(frozen=True)
class SectionList(Kind[tuple[S, ...]]):
    """A JSON array of ``cls`` objects whose ``unique`` key differs from one to the next."""

    cls: type[S]
    noun: str
    unique: str

    @property
    def accepted(self) -> str:
        return f"a JSON array of {self.noun} objects"

    def from_json(self, where: str, value: object) -> tuple[S, ...]:
        if not isinstance(value, list):
            raise v.fail(where, value, self.accepted)
        items = tuple(parse_section(f"{where}[{i}]", x, self.cls) for i, x in enumerate(value))
        seen: set[object] = set()
        for i, item in enumerate(items):
            key = getattr(item, self.unique)
            if key in seen:
                raise ConfigError(
                    f"{where}[{i}].{self.unique}: {key!r} is a duplicate: "
                    f"{self.noun} {self.unique}s must be unique"
                )
            seen.add(key)
        return items

    def from_env(self, where: str, text: str) -> tuple[S, ...]:
        raise TypeError(f"{where}: a list of sections is not read from an env var")


# --------------------------------------------------------------------------------------------
# The spec of one setting.


@dataclass(frozen=True)
class Spec:
    """Everything tensord states about one setting, in one place."""

    kind: Kind[Any]
    doc: str  # what it means, for the README
    env: str | None = None  # the tensord variable
    ollama: str | None = None  # Ollama's name for the same variable; TENSORD_* wins
    flag: str | None = None  # the command-line flag (load_settings takes it as an argument)
    key: str | None = None  # the cluster-file key when it is not the field's name
    in_file: bool = True  # False: set by env var or flag only (node_id, listen, ...)
    default_doc: str | None = None  # the README's default when it is not a constant

    @property
    def env_names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.env, self.ollama) if name)


def setting(
    default: T,
    kind: Kind[T],
    doc: str,
    *,
    env: str | None = None,
    ollama: str | None = None,
    flag: str | None = None,
    key: str | None = None,
    in_file: bool = True,
    default_doc: str | None = None,
) -> T:
    """A dataclass field with a default and its :class:`Spec` (typed as the value, like attrs'
    ``attr.ib``, so ``chunk_size: int = setting(...)`` type-checks)."""
    spec = Spec(kind, doc, env, ollama, flag, key, in_file, default_doc)
    out: T = field(default=default, metadata={_SPEC: spec})
    return out


def required(kind: Kind[Any], doc: str) -> Any:
    """A setting without a default: a cluster-file object must give it (``nodes[].id``)."""
    return field(metadata={_SPEC: Spec(kind, doc)})


def spec_of(cls: type, name: str) -> Spec:
    """The spec of ``cls.name`` (``spec_of(TransferSettings, "window_bytes").env``)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            spec: Spec = f.metadata[_SPEC]
            return spec
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def specs(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Spec]]:
    """The settings of a section class, in declaration order."""
    for f in dataclasses.fields(cls):
        if _SPEC in f.metadata:
            yield f, f.metadata[_SPEC]


# --------------------------------------------------------------------------------------------
# Derived: the cluster-file check.


def parse_keys(where: str, value: object, cls: type) -> dict[str, Any]:
    """Validate a JSON object against the settings of ``cls``: every key known and valid, every
    required key present. Returns the values by field name (unknown keys are errors, never
    ignored: a misspelt key would otherwise silently leave the default in force)."""
    if not isinstance(value, dict):
        raise v.fail(where, value, "a JSON object")
    keys = {spec.key or f.name: (f, spec) for f, spec in specs(cls) if spec.in_file}
    out: dict[str, Any] = {}
    for key, raw in value.items():
        found = keys.get(key)
        if found is None:
            raise ConfigError(
                f"{where}: unknown key {key!r}: expected one of {', '.join(sorted(keys))}"
            )
        out[found[0].name] = found[1].kind.from_json(f"{where}.{key}", raw)
    needed = [k for k, (f, _) in keys.items() if _is_required(f)]
    missing = [k for k in needed if keys[k][0].name not in out]
    if missing:
        raise ConfigError(
            f"{where}: missing {', '.join(map(repr, missing))}: expected "
            f"{' and '.join([', '.join(needed[:-1]), needed[-1]] if len(needed) > 1 else needed)}"
        )
    return out


def parse_section(where: str, value: object, cls: type[S]) -> S:
    """A section object from the file, checked by its keys and then, if the class has a
    ``violation()`` method, by the rule across keys that it states."""
    section = cls(**parse_keys(where, value, cls))
    check = getattr(section, "violation", None)
    if check is not None and (problem := check()) is not None:
        raise ConfigError(f"{where}: {problem}")
    return section


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# --------------------------------------------------------------------------------------------
# Derived: env vars.


def env_raw(env: Mapping[str, str], spec: Spec) -> tuple[str, str] | None:
    """The first of the setting's variables that is set and not empty (``TENSORD_*`` before the
    Ollama alias), with its value."""
    for name in spec.env_names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return name, value
    return None


def env_override(env: Mapping[str, str], cls: type, name: str, current: Any) -> Any:
    """``cls.name`` from its variable if one is set, else ``current``."""
    spec = spec_of(cls, name)
    found = env_raw(env, spec)
    return current if found is None else spec.kind.from_env(*found)


def with_env(section: S, env: Mapping[str, str]) -> S:
    """``section`` with every setting that has a variable set replaced by the variable's value."""
    changes = {}
    for f, spec in specs(type(section)):
        if (found := env_raw(env, spec)) is not None:
            changes[f.name] = spec.kind.from_env(*found)
    updated: S = dataclasses.replace(cast(Any, section), **changes)
    return updated


# --------------------------------------------------------------------------------------------
# Derived: the list of every setting (env var table, README).


@dataclass(frozen=True)
class Row:
    """One setting as documentation lists it: ``path`` is its cluster-file key
    (``transfer.window_bytes``, ``nodes[].id``) or, for a setting the file does not hold, its
    field name."""

    path: str
    field: dataclasses.Field[Any]
    spec: Spec

    @property
    def nested(self) -> type | None:
        """The section class this setting holds (an object or a list of them), if any."""
        kind = self.spec.kind
        if isinstance(kind, Nullable):
            kind = kind.inner
        return kind.cls if isinstance(kind, Section | SectionList) else None

    @property
    def is_list(self) -> bool:
        return isinstance(self.spec.kind, SectionList)


def walk(cls: type, prefix: str = "") -> Iterator[Row]:
    """Every setting of ``cls`` and of the sections it holds, depth first, in declaration order."""
    for f, spec in specs(cls):
        row = Row(prefix + (spec.key or f.name), f, spec)
        yield row
        if (nested := row.nested) is not None:
            yield from walk(nested, row.path + ("[]." if row.is_list else "."))
