"""Planning: what the rules decided, the policies every plan obeys, and the Plan table lora_fx.plan returns.

    sites --rules.decide--> decisions --resolve_tied, refuse_other_readers, one_lora_per_weight--> Plan

The policies exist because fold writes W0 + delta into one tensor: whatever else reads that tensor (a tied twin,
a non-linear op, another call site) would change too, so each such weight is skipped, refused or given its LoRA at
every site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from torch import nn

from lora_fx.errors import RuleError, warn
from lora_fx.rules import Decision, Rule


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """{parameter name: the other names of the same tensor} for parameters shared between modules."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [o for o in group if o != n] for group in names.values() if len(group) > 1 for n in group}


def resolve_tied(decisions: list[Decision], tied: dict[str, list[str]], rules_given: bool, untie: bool,
                 frontend: str) -> list[Decision]:
    """A LoRA folded into a tied weight would silently change its twin (an embedding, say): refuse or untie.

    rules=None skips tied weights with a warning; a rule that selects one raises unless untie=True. Untying gives
    the folded model its own copy of the weight, so its ONNX export has one initializer more than the base's.
    """
    out = []
    for d in decisions:
        twins = tied.get(d.site.weight)
        if not d.adapted or not twins:
            out.append(d)
            continue
        if not rules_given:
            warn(f"lora_fx: skipping {d.site.weight!r}: it is tied to {twins} (rules=None adapts only "
                          f"untied weights; select it with a rule and untie=True to adapt it)")
            out.append(replace(d, settings=None, reason=f"tied to {twins}: skipped"))
            continue
        if not untie:
            raise RuleError(
                f"weight {d.site.weight!r} is tied to {twins} (the same tensor): folding a LoRA into it would "
                f"change {twins} too", where=d.site.name,
                fix=f"exclude it (Rule(name={d.site.name!r}, exclude=True)), or pass untie=True to give the folded "
                    f"model its own copy of {d.site.weight!r} (its ONNX export then has one more initializer)")
        if frontend == "export":
            module, _, leaf = d.site.weight.rpartition(".")
            owner = f"model.{module}" if module else "model"
            raise RuleError(
                f"weight {d.site.weight!r} is tied to {twins} and the torch.export graph reads both through one "
                f"node, so adapt cannot untie them there", where=d.site.name,
                fix=f"untie them in the model before adapt: {owner}.{leaf} = nn.Parameter({owner}.{leaf}.detach()"
                    f".clone()) (a transformers model also needs model.config.tie_word_embeddings = False, so that a "
                    f"saved merged model loads untied); or exclude this site")
        out.append(d)
    return out


def refuse_other_readers(decisions: list[Decision], rules_given: bool) -> list[Decision]:
    """A weight that another op reads under the same name (an embedding table reused by an output projection)
    cannot carry a LoRA: fold writes W0 + delta into the one tensor, which changes that op too, and there is no
    second name to untie to. rules=None skips such weights with a warning; a rule that selects one raises."""
    out = []
    for d in decisions:
        readers = d.site.other_readers
        if not d.adapted or not readers:
            out.append(d)
            continue
        if rules_given:
            raise RuleError(
                f"weight {d.site.weight!r} is also read by {list(readers)} (not a linear site): folding a LoRA into "
                f"it would change what they compute too", where=d.site.name,
                fix=f"exclude it (Rule(name={d.site.name!r}, exclude=True)); to adapt it, give the model a separate "
                    f"parameter for this use")
        warn(f"lora_fx: skipping {d.site.weight!r}: it is also read by {list(readers)}, which a fold would "
                      f"change")
        out.append(replace(d, settings=None, reason=f"also read by {list(readers)}: skipped"))
    return out


def apply_policies(decisions: list[Decision], *, tied: dict[str, list[str]], rules_given: bool, untie: bool,
                   frontend: str) -> list[Decision]:
    """The policies every plan obeys, in order: tied weights, weights with other readers, one LoRA per weight."""
    decisions = resolve_tied(decisions, tied, rules_given, untie, frontend)
    decisions = refuse_other_readers(decisions, rules_given)
    return one_lora_per_weight(decisions)


def _rows(d: Decision) -> set[int] | None:
    """The weight rows a decision covers (None: all of them)."""
    return {i for _, ranges in d.rows for a, b in ranges for i in range(a, b)} if d.rows else None


def _overlap(a: Decision, b: Decision) -> bool:
    ra, rb = _rows(a), _rows(b)
    return ra is None or rb is None or bool(ra & rb)


def one_lora_per_weight(decisions: list[Decision]) -> list[Decision]:
    """fold writes W0 + delta into the one tensor, so every linear site of an adapted weight must carry its LoRA.

    A weight's LoRAs ("units": the whole weight, or each adapted role slice) are those its sites' decisions chose.
    A site of that weight that lacks one (DeBERTa's query_proj on its relative-position path under
    Rule(role="attn.q"); an nn.Linear also called through F.linear) gets it too; a site that a rule explicitly
    excludes raises, since folding would change it anyway. Sites reading other rows of a weight (a split before
    F.linear) do not interact."""
    units: dict[tuple, dict[tuple, Decision]] = {}
    key = lambda d: (d.site.weight, d.site.weight_rows)
    for d in decisions:
        if d.adapted:
            units.setdefault(key(d), {}).setdefault(d.rows, d)
    by_site: dict[str, list[Decision]] = {}
    for d in decisions:
        by_site.setdefault(d.site.node, []).append(d)
    out = []
    for ds in by_site.values():
        chosen = units.get(key(ds[0]), {})
        for d in ds:
            clash = next((c for c in chosen.values() if _overlap(c, d)), None) if not d.adapted else None
            if clash is not None and d.rule_index is not None:  # a rule matched this site and excluded it
                raise RuleError(
                    f"weight {d.site.weight!r} gets a LoRA at {clash.site.node} but rule {d.rule_index} excludes "
                    f"its other site {d.site.node}: one weight has one LoRA, applied at every site that uses it",
                    where=d.site.name, fix="exclude every site of this weight or none of them (lora_fx.plan lists them)")
        have = {d.rows for d in ds if d.adapted}
        missing = [c for rows, c in chosen.items() if rows not in have]
        if not missing:
            out.extend(ds)
            continue
        site = ds[0].site
        out.extend(d for d in ds if d.adapted or not any(_overlap(c, d) for c in missing))
        out.extend(replace(c, site=site, reason=f"same weight as {c.site.node}: one LoRA per weight, applied at "
                                                f"every site") for c in missing)
    return out


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
        # an expert weight has one A and one B per expert
        return d.settings.r * (d.site.in_features + d.site.out_features) * d.site.param("num_experts", 1)

    def parameters_added(self) -> int:
        """LoRA parameters adapt would add (a weight used at several sites counts once)."""
        return sum({(d.site.weight, d.rows): self._params(d) for d in self.adapted}.values())

    def rows(self) -> list[dict]:
        rows = []
        for d in self.decisions:
            s = d.site
            rows.append({
                "site": s.name, "node": s.node, "op": s.op, "weight": s.weight,
                "shape": (f"{s.param('num_experts')}x" if s.param("num_experts") else "") + f"{s.out_features}x{s.in_features}", "roles": list(s.roles), "layer": s.layer,
                "rule": d.rule_index, "adapted": d.adapted,
                "r": d.settings.r if d.settings else None, "requested_r": d.requested_r,
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
        body = [[r["site"] + "".join(f" [{role} rows]" for role in r["slices"]), r["op"], r["shape"],
                 ",".join(r["roles"]) or "-",
                 "-" if r["rule"] is None else str(r["rule"]) + ("" if r["adapted"] else " (excluded)"),
                 str(r["r"] or "-") + (f" (capped from {r['requested_r']})" if r["requested_r"] else ""),
                 f"{r['alpha']:g}" if r["alpha"] else "-", str(r["params"])]
                for r in self.rows()]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in body]
        sites = {d.site.node for d in self.decisions}
        adapted = {d.site.node for d in self.adapted}
        out.append(f"{len(adapted)} of {len(sites)} sites adapted, "
                   f"{self.parameters_added():,} LoRA parameters, front end: {self.frontend}")
        out += [f"note: {name}: {why}" for name, why in self.whole_weight_notes().items()]
        return "\n".join(out)

    def whole_weight_notes(self) -> dict[str, str]:
        """Packed weights (q, k and v in one) that a role rule adapts whole, because which rows feed which role could
        not be followed: the LoRA covers the other roles' rows too."""
        return {d.site.name: f"rule {d.rule_index} selects it by role {list(d.roles)}, but the rows of each of "
                             f"{list(d.site.roles)} could not be followed ({d.site.rows_lost}), so the LoRA covers "
                             f"the whole weight"
                for d in self.adapted if d.roles and d.site.rows_lost and not d.rows}

    def __str__(self) -> str:
        return self.table()
