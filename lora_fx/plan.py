"""The result of lora_fx.plan: one row per candidate site, printable as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lora_fx.rules import Decision, Rule


@dataclass
class Plan:
    frontend: str
    rules: list[Rule] | None
    decisions: list[Decision]

    @property
    def adapted(self) -> list[Decision]:
        return [d for d in self.decisions if d.adapted]

    @staticmethod
    def _params(d: Decision) -> int:
        """r·(in + out) for a whole weight; r·(in + rows) for each role slice of a packed weight."""
        if not d.adapted:
            return 0
        if d.rows:
            return sum(d.settings.r * (d.site.in_features + sum(e - s for s, e in ranges)) for _, ranges in d.rows)
        return d.settings.r * (d.site.in_features + d.site.out_features)

    def parameters_added(self) -> int:
        """LoRA parameters adapt would add (a weight used at several sites counts once)."""
        return sum({(d.site.weight, d.rows): self._params(d) for d in self.adapted}.values())

    def rows(self) -> list[dict]:
        rows = []
        for d in self.decisions:
            s = d.site
            rows.append({
                "site": s.name, "node": s.node, "op": s.op, "weight": s.weight,
                "shape": f"{s.out_features}x{s.in_features}", "roles": list(s.roles), "layer": s.layer,
                "rule": d.rule_index, "adapted": d.adapted,
                "r": d.settings.r if d.settings else None,
                "alpha": d.settings.alpha if d.settings else None,
                "params": self._params(d), "slices": [role for role, _ in d.rows],
                "why": d.reason,
            })
        return rows

    def to_json(self) -> str:
        return json.dumps({"frontend": self.frontend,
                           "rules": [r.to_dict() for r in self.rules] if self.rules is not None else None,
                           "sites": self.rows(), "parameters_added": self.parameters_added()}, indent=2)

    def table(self) -> str:
        header = ["site", "op", "shape", "roles", "rule", "r", "alpha", "params"]
        body = [[r["site"], r["op"], r["shape"], ",".join(r["roles"]) or "-",
                 "-" if r["rule"] is None else str(r["rule"]) + ("" if r["adapted"] else " (excluded)"),
                 str(r["r"] or "-"), f"{r['alpha']:g}" if r["alpha"] else "-", str(r["params"])]
                for r in self.rows()]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in body]
        out.append(f"{len(self.adapted)} of {len(self.decisions)} sites adapted, "
                   f"{self.parameters_added():,} LoRA parameters, front end: {self.frontend}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()
