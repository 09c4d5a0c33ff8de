"""A two-way table of key renames, and a report of every key it did not carry over."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor


def _compile(template: str) -> re.Pattern[str]:
    """``"encoder.layer.{i}.attention."`` -> a regex; ``{i}`` is a layer index. A template ending
    in "." matches as a prefix, any other one matches a whole key."""
    pattern = "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(pattern if template.endswith(".") else pattern + "$")


@dataclass
class ConversionReport:
    """What a conversion did not carry over: dropped on purpose (with the reason) or unknown."""

    dropped: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def raise_if_unmatched(self, source: str) -> None:
        if self.unmatched:
            keys = "\n  ".join(sorted(self.unmatched))
            raise KeyError(f"{len(self.unmatched)} key(s) of the {source} state dict have no place here:\n  {keys}")

    def summary(self) -> str:
        lines = [f"dropped {len(self.dropped)} key(s) on purpose"]
        lines += [f"  {k}: {why}" for k, why in sorted(self.dropped.items())]
        if self.unmatched:
            lines.append(f"unmatched {len(self.unmatched)} key(s)")
            lines += [f"  {k}" for k in sorted(self.unmatched)]
        return "\n".join(lines)


@dataclass(frozen=True)
class RenameTable:
    """Prefix renames ``(theirs, ours)``; ``{i}`` stands for a layer index. ``drop`` and
    ``drop_ours`` map prefixes that have no counterpart on the other side to the reason."""

    rules: tuple[tuple[str, str], ...]
    drop: tuple[tuple[str, str], ...] = ()
    drop_ours: tuple[tuple[str, str], ...] = ()

    def __add__(self, other: RenameTable) -> RenameTable:
        return RenameTable(self.rules + other.rules, self.drop + other.drop, self.drop_ours + other.drop_ours)

    def under(self, theirs: str, ours: str) -> RenameTable:
        """The same table for a sub-module: every prefix of theirs under ``theirs``, of ours
        under ``ours``."""
        return RenameTable(
            tuple((theirs + a, ours + b) for a, b in self.rules),
            tuple((theirs + a, why) for a, why in self.drop),
            tuple((ours + a, why) for a, why in self.drop_ours),
        )

    @staticmethod
    def _apply(
        state_dict: Mapping[str, Tensor],
        pairs: Iterable[tuple[str, str]],
        drop: Iterable[tuple[str, str]],
        source_prefix: str,
        target_prefix: str,
    ) -> tuple[dict[str, Tensor], ConversionReport]:
        compiled = [(_compile(source_prefix + src), dst) for src, dst in pairs]
        dropping = [(_compile(source_prefix + src), why) for src, why in drop]
        out: dict[str, Tensor] = {}
        report = ConversionReport()
        for key, tensor in state_dict.items():
            for pattern, dst in compiled:
                match = pattern.match(key)
                if match:
                    name = target_prefix + dst.replace("{i}", match.groupdict().get("i") or "")
                    out[name + key[match.end():]] = tensor
                    break
            else:
                reason = next((why for pattern, why in dropping if pattern.match(key)), None)
                if reason is None:
                    report.unmatched.append(key)
                else:
                    report.dropped[key] = reason
        return out, report

    def to_ours(
        self, state_dict: Mapping[str, Tensor], prefix: str = "", ours_prefix: str = ""
    ) -> tuple[dict[str, Tensor], ConversionReport]:
        """Keys of theirs starting with ``prefix`` -> ours (under ``ours_prefix``)."""
        return self._apply(state_dict, self.rules, self.drop, prefix, ours_prefix)

    def to_theirs(
        self, state_dict: Mapping[str, Tensor], prefix: str = "", ours_prefix: str = ""
    ) -> tuple[dict[str, Tensor], ConversionReport]:
        """Keys of ours starting with ``ours_prefix`` -> theirs (under ``prefix``)."""
        return self._apply(state_dict, [(dst, src) for src, dst in self.rules], self.drop_ours, ours_prefix, prefix)
