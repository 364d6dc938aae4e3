"""`validate`: the single place that checks a connection's type, provider, config and secrets.

It collects every violation before raising, so a caller fixes a form in one round trip.
Descriptions name the problem and never quote a value: anything a caller sent may be a
secret pasted into the wrong box. Field *names* appear in paths (`config.pasword`) because
naming the typo is the point; a key that is not even a plausible name is not quoted.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from broker.catalog._registry import get_type
from broker.catalog._spec import PROVIDER, Cond, ConnectionType, FieldSpec, Problem, Rule, RuleKind, Validated
from broker.catalog._values import MAX_STRING, json_value, looks_secret, parse
from broker.errors import FieldViolation, InvalidArgument

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _nested_secret_key(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(looks_secret(str(k)) or _nested_secret_key(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_nested_secret_key(v) for v in value)
    return False


class _Run:
    """The state of one validation: what was read, what was wrong, what is set."""

    def __init__(self, ctype: ConnectionType, provider: str) -> None:
        self.ctype = ctype
        self.provider = provider
        self.violations: list[FieldViolation] = []
        self.bad: set[str] = set()  # field names (and PROVIDER) that already have a violation
        self.given: set[str] = set()  # fields the caller set, as opposed to defaulted ones
        self.config: dict[str, Any] = {}
        self.secrets: dict[str, str] = {}

    def fail(self, path: str, description: str, name: str | None = None) -> None:
        self.violations.append(FieldViolation(path, description))
        if name is not None:
            self.bad.add(name)

    def path(self, spec: FieldSpec) -> str:
        return f"{'secrets' if spec.secret else 'config'}.{spec.name}"

    def is_set(self, name: str) -> bool:
        return name in self.config or name in self.secrets

    # ------------------------------------------------------------------ provider

    def read_provider(self) -> None:
        ctype, provider = self.ctype, self.provider
        if not isinstance(provider, str):
            self.fail("provider", "must be a string", PROVIDER)
        elif not ctype.providers:
            if provider:
                self.fail("provider", f"must be empty: type {ctype.name} takes no provider", PROVIDER)
        elif not provider:
            self.fail("provider", f"is required for type {ctype.name}", PROVIDER)
        elif provider not in ctype.providers:
            self.fail("provider", "must be one of: " + ", ".join(ctype.providers), PROVIDER)

    # ------------------------------------------------------------------ config and secrets

    def read_config(self, config: Mapping[str, Any]) -> None:
        for key, value in config.items():
            if not isinstance(key, str) or not NAME.fullmatch(key):
                self.fail("config", "field names must be 1 to 64 letters, digits, '_', '.' or '-'")
                continue
            if self.ctype.open_config:
                self._read_open(key, value)
                continue
            spec = self.ctype.spec(key)
            if spec is None:
                self.fail(f"config.{key}", f"unknown field for type {self.ctype.name}")
            elif spec.secret:
                self.fail(f"config.{key}", "is a secret field: pass it in secrets, not config", key)
            elif value is None or value == "":
                # A form's untouched input arrives empty; it means "not set", so defaults apply.
                continue
            else:
                try:
                    self.config[key] = parse(spec, value)
                    self.given.add(key)
                except Problem as problem:
                    self.fail(f"config.{key}", str(problem), key)

    def _read_open(self, key: str, value: Any) -> None:
        if looks_secret(key):
            self.fail(f"config.{key}", "looks like a secret: pass it in secrets, not config", key)
        elif _nested_secret_key(value):
            self.fail(f"config.{key}", "contains a key that looks like a secret: pass it in secrets", key)
        else:
            try:
                self.config[key] = json_value(value)
            except Problem as problem:
                self.fail(f"config.{key}", str(problem), key)

    def read_secrets(self, secrets: Mapping[str, str]) -> None:
        for key, value in secrets.items():
            if not isinstance(key, str) or not NAME.fullmatch(key):
                self.fail("secrets", "secret names must be 1 to 64 letters, digits, '_', '.' or '-'")
                continue
            spec = self.ctype.spec(key)
            if spec is None and not self.ctype.open_config:
                self.fail(f"secrets.{key}", f"unknown secret field for type {self.ctype.name}")
            elif spec is not None and not spec.secret:
                self.fail(f"secrets.{key}", "is not a secret field: pass it in config", key)
            elif not isinstance(value, str):
                self.fail(f"secrets.{key}", "must be a string", key)
            elif not value:
                self.fail(f"secrets.{key}", "must not be empty", key)
            elif len(value) > MAX_STRING:
                self.fail(f"secrets.{key}", f"must be at most {MAX_STRING} characters", key)
            else:
                try:
                    if spec is not None and spec.check is not None:
                        spec.check(value)
                    self.secrets[key] = value
                except Problem as problem:
                    self.fail(f"secrets.{key}", str(problem), key)

    # ------------------------------------------------------------------ defaults and rules

    def _known(self, conds: tuple[Cond, ...]) -> bool:
        """Whether every field the conditions read is free of violations."""
        return not any(c.field in self.bad for c in conds)

    def _holds(self, conds: tuple[Cond, ...]) -> bool:
        context = {PROVIDER: self.provider, **self.config}
        return self._known(conds) and all(c.holds(context.get(c.field)) for c in conds)

    def apply_defaults(self) -> None:
        derived = {d.field for d in self.ctype.defaults}
        # Static defaults first: conditions (e.g. smtp's encryption) may read them.
        for spec in self.ctype.fields:
            if spec.name not in derived and self._may_default(spec) and spec.default is not None:
                self.config[spec.name] = copy.deepcopy(spec.default)
        for spec in self.ctype.fields:
            if spec.name not in derived or not self._may_default(spec):
                continue
            mine = [d for d in self.ctype.defaults if d.field == spec.name]
            if not all(self._known(d.when) for d in mine):
                continue  # the field it depends on is wrong; guessing would only add noise
            chosen = next((d.value for d in mine if self._holds(d.when)), spec.default)
            if chosen is not None:
                self.config[spec.name] = copy.deepcopy(chosen)

    def _may_default(self, spec: FieldSpec) -> bool:
        return not spec.secret and spec.name not in self.config and spec.name not in self.bad

    def check_required(self) -> None:
        for spec in self.ctype.fields:
            if spec.required and not self.is_set(spec.name) and spec.name not in self.bad:
                self.fail(self.path(spec), "is required", spec.name)
        rejected_secret = any(v.field.startswith("secrets") for v in self.violations)
        if self.ctype.open_config and not self.secrets and not rejected_secret:
            self.fail("secrets", f"at least one secret is required for type {self.ctype.name}")

    def _because(self, conds: tuple[Cond, ...]) -> str:
        """' for driver postgresql', ' when auth_type is bearer': the actual, validated values."""
        context = {PROVIDER: self.provider, **self.config}
        # The provider and database's driver pick a flavour of the type: "for driver mysql" reads better.
        if len(conds) == 1 and conds[0].field in (PROVIDER, "driver"):
            return f" for {conds[0].field} {context.get(conds[0].field)}"
        parts = [f"{c.field} is {context.get(c.field)}" for c in conds]
        return " when " + " and ".join(parts) if parts else ""

    def check_rule(self, rule: Rule) -> None:
        if not self._holds(rule.when):
            return
        specs = [s for s in (self.ctype.spec(n) for n in rule.fields) if s is not None]
        because = self._because(rule.when)
        if rule.kind is RuleKind.REQUIRE:
            for spec in specs:
                if not self.is_set(spec.name) and spec.name not in self.bad:
                    self.fail(self.path(spec), "required" + because, spec.name)
        elif rule.kind is RuleKind.FORBID:
            for spec in specs:
                if spec.name in self.given or spec.name in self.secrets:
                    self.fail(self.path(spec), "not used" + because, spec.name)
        elif not any(self.is_set(s.name) or s.name in self.bad for s in specs):
            for spec in specs:
                others = " or ".join(s.name for s in specs if s is not spec)
                self.fail(self.path(spec), f"required unless {others} is set" + because, spec.name)

    def result(self) -> Validated:
        if self.violations:
            raise InvalidArgument(self.violations)
        order = {spec.name: i for i, spec in enumerate(self.ctype.fields)}
        config = dict(sorted(self.config.items(), key=lambda item: order.get(item[0], len(order))))
        return Validated(self.ctype.name, self.provider, config, dict(self.secrets))


def validate(
    type_name: str, provider: str, config: Mapping[str, Any], secrets: Mapping[str, str]
) -> Validated:
    """Check a connection's content and return it cleaned: defaults applied, values normalised,
    secret fields split from config. Raises InvalidArgument naming every field at fault.
    """
    run = _Run(get_type(type_name), provider)
    run.read_provider()
    if isinstance(config, Mapping):
        run.read_config(config)
    else:
        run.fail("config", "must be an object")
    if isinstance(secrets, Mapping):
        run.read_secrets(secrets)
    else:
        run.fail("secrets", "must be a map of names to strings")
    run.apply_defaults()
    run.check_required()
    for rule in run.ctype.rules:
        run.check_rule(rule)
    return run.result()


def validate_field(type_name: str, name: str, value: Any, path: str) -> Any:
    """One config field of a type, checked as `validate` checks it; violations are reported at `path`."""
    spec = get_type(type_name).spec(name)
    if spec is None:
        raise ValueError(f"type {type_name} has no field {name}")
    try:
        return parse(spec, value)
    except Problem as problem:
        raise InvalidArgument.field(path, str(problem)) from None
