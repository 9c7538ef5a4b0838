"""A/B variants: stable assignment, impressions, attributed interactions, Wilson intervals.

Assignment: a user's variant is a pure function of (salt, user id): ``sha256(salt + "\\0" +
id)`` read as a number in [0, 1) and placed against the variants' cumulative shares. It needs
no stored state, survives restarts, and changing the salt reshuffles everyone (a new
experiment). Traffic beyond the configured shares goes to the ``"default"`` variant.

Impressions: every list a user receives (an HTTP response or a websocket push) is one
impression of that user's variant. Per user only the newest ``per_user`` impressions (time,
variant, items) are remembered, and only for ``max_users`` users (least recently shown go
first), so memory is bounded whatever the traffic.

Attribution happens at ingest, in ``Engine.append``, once the events are durable: an
interaction (user U, item I) is credited to the variant of the newest impression shown to U
within ``window`` seconds that contained I. Ingest is where the events are already decoded
for HTTP and websockets and where the item is known; the model actor only reports which users
moved. An event refused later by the model was still a real click on a shown item, so
crediting it is right. Forward frames are decoded in Python for this, but only while some
impression is remembered at all.

Rate: the share of impressions that drew at least one attributed interaction (a binomial
proportion), with the Wilson score interval (E. B. Wilson, "Probable inference, the law of
succession, and statistical inference", JASA 22(158), 1927), which unlike the normal
approximation stays inside [0, 1] and behaves at small counts and rates near 0 or 1.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._exceptions import ConfigError

__all__ = ["DEFAULT_VARIANT", "Experiments", "Variant", "assign", "wilson_interval"]

DEFAULT_VARIANT = "default"
Id = str | int
#: What a variant may override besides ``k``: the keyword arguments of ``Model.recommend``
#: that shape a list (the per-request ones, ``exclude`` or ``detail``, are left to requests).
VARIANT_PARAMS = frozenset(
    {"diversity", "exploration", "exclude_seen", "category", "exclude_category", "exact"}
)
# Two-sided 95 %: the 0.975 quantile of the standard normal distribution.
Z95 = 1.959963984540054


@attrs.frozen(kw_only=True)
class Variant:
    """One arm of an experiment.

    Attributes:
        name: Reported in every response and push, and in ``GET /v1/experiments``.
        share: Fraction of users in this arm, in (0, 1].
        k: List length when the request does not say (None: the server's default).
        params: Further keyword arguments for ``Model.recommend``, names from
            :data:`VARIANT_PARAMS` (e.g. ``diversity``, ``exploration``).
    """

    name: str
    share: float
    k: int | None = None
    params: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        """From a ``[[variants]]`` TOML table: ``name``, ``share``, ``k`` and overrides.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type, or a key is
                not a known parameter (a misspelling fails at start, not at the first request).
        """
        d = dict(d)
        try:
            name, share = str(d.pop("name")), float(d.pop("share"))
            k = d.pop("k", None)
            k = None if k is None else int(k)
        except KeyError as e:
            raise ConfigError(f"a variant needs {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"variant {d.get('name', '?')!r}: {e}") from None
        known = sorted(VARIANT_PARAMS | {"name", "share", "k"})
        for key, value in d.items():
            if key not in VARIANT_PARAMS:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise ConfigError(f"variant {name!r}: unknown parameter {key!r}; {hint}")
            if key in ("diversity", "exploration") and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ConfigError(f"variant {name!r}: {key} must be a number, got {value!r}")
        return cls(name=name, share=share, k=k, params=d)


def check_variants(variants: Iterable[Variant]) -> tuple[Variant, ...]:
    """Validates names and shares; raises ConfigError."""
    out = tuple(variants)
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError("variant names must be unique")
    for v in out:
        if not 0 < v.share <= 1 or not v.name:
            raise ConfigError(f"variant {v.name!r}: share must be in (0, 1] and a name given")
    if sum(v.share for v in out) > 1 + 1e-9:
        raise ConfigError("variant shares add up to more than 1")
    return out


def _unit(salt: str, user: Id) -> float:
    digest = hashlib.sha256(f"{salt}\0{user}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(variants: tuple[Variant, ...], salt: str, user: Id) -> Variant | None:
    """The variant ``user`` belongs to; None for the default (no variant covers it)."""
    x = _unit(salt, user)
    edge = 0.0
    for v in variants:
        edge += v.share
        if x < edge:
            return v
    return None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; (0, 1) when n is 0.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class _Impression:
    __slots__ = ("at", "converted", "items", "variant")

    def __init__(self, at: float, variant: str, items: frozenset[Id]) -> None:
        self.at = at
        self.variant = variant
        self.items = items
        self.converted = False


class _Counts:
    __slots__ = ("converted", "impressions", "interactions")

    def __init__(self) -> None:
        self.impressions = 0
        self.interactions = 0
        self.converted = 0


class Experiments:
    """Assignment and bookkeeping of the configured variants.

    Args:
        variants: The arms; empty turns experiments off (everyone is ``"default"``, nothing
            is recorded).
        salt: Mixed into the assignment hash.
        window: Seconds after an impression during which an interaction is attributed to it.
        per_user: Impressions remembered per user.
        max_users: Users whose impressions are remembered.
    """

    def __init__(
        self,
        variants: tuple[Variant, ...] = (),
        *,
        salt: str = "recstream",
        window: float = 1800.0,
        per_user: int = 8,
        max_users: int = 100_000,
    ) -> None:
        self.variants = check_variants(variants)
        self.salt = salt
        self.window = window
        self.per_user = per_user
        self.max_users = max_users
        self._shown: OrderedDict[Id, deque[_Impression]] = OrderedDict()
        self._counts: dict[str, _Counts] = {v.name: _Counts() for v in self.variants}
        if self.variants and sum(v.share for v in self.variants) < 1 - 1e-9:
            self._counts[DEFAULT_VARIANT] = _Counts()

    @property
    def enabled(self) -> bool:
        return bool(self.variants)

    @property
    def tracking(self) -> bool:
        """Whether any impression is remembered (attribution has something to find)."""
        return bool(self._shown)

    def variant_of(self, user: Id) -> Variant | None:
        return assign(self.variants, self.salt, user) if self.variants else None

    def name_of(self, user: Id) -> str:
        v = self.variant_of(user)
        return v.name if v is not None else DEFAULT_VARIANT

    def impression(self, user: Id, items: Iterable[Id], now: float) -> None:
        """Records that ``user`` was shown ``items`` (one list) at ``now``."""
        if not self.variants:
            return
        variant = self.name_of(user)
        self._counts[variant].impressions += 1
        shown = self._shown.get(user)
        if shown is None:
            shown = self._shown[user] = deque(maxlen=self.per_user)
            if len(self._shown) > self.max_users:
                self._shown.popitem(last=False)
        else:
            self._shown.move_to_end(user)
        shown.append(_Impression(now, variant, frozenset(items)))

    def interaction(self, user: Id, item: Id, now: float) -> str | None:
        """Attributes one interaction; returns the variant credited, or None."""
        shown = self._shown.get(user)
        if not shown:
            return None
        for imp in reversed(shown):
            if now - imp.at > self.window:
                break
            if item in imp.items:
                counts = self._counts[imp.variant]
                counts.interactions += 1
                if not imp.converted:
                    imp.converted = True
                    counts.converted += 1
                return imp.variant
        return None

    def forget(self, user: Id) -> None:
        """Drops what is remembered about ``user`` (erasure). Totals are kept: they are
        aggregates that name no one."""
        self._shown.pop(user, None)

    def report(self) -> dict[str, Any]:
        """Per-variant impressions, attributed interactions, rate and its 95 % interval."""
        out = []
        shares = {v.name: v.share for v in self.variants}
        if DEFAULT_VARIANT in self._counts:
            shares[DEFAULT_VARIANT] = max(0.0, 1 - sum(shares.values()))
        for name, c in self._counts.items():
            lo, hi = wilson_interval(c.converted, c.impressions)
            out.append(
                {
                    "name": name,
                    "share": shares[name],
                    "impressions": c.impressions,
                    "interactions": c.interactions,
                    "converted": c.converted,
                    "rate": c.converted / c.impressions if c.impressions else 0.0,
                    "ci95": [lo, hi],
                }
            )
        return {"variants": out, "window": self.window, "interval": "wilson"}
