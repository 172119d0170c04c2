#!/usr/bin/env python3
"""Checks a Grafana dashboard: its JSON is importable, and every PromQL
expression in it parses and returns data from a live Prometheus.

    promql_check.py DASHBOARD.json                      # structure only
    promql_check.py DASHBOARD.json --prometheus URL     # and every query

Grafana variables are replaced before a query is sent: $__rate_interval by
1m, $__range by 5m, each template variable by `.*` (its "All" value).
Prints one line per check (OK/FAIL, or SKIP for an empty result allowed by
--allow-empty) and exits 1 if any failed.
Standard library only.
"""

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
    "__interval_ms": "15000",
}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
METRIC_RE = re.compile(r"\b(embgate_[A-Za-z0-9_]+)")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


class Report:
    def __init__(self):
        self.failed = 0
        self.passed = 0
        self.skipped = 0

    def ok(self, what, detail=""):
        self.passed += 1
        print(f"OK    {what}" + (f"  ({detail})" if detail else ""))

    def fail(self, what, detail):
        self.failed += 1
        print(f"FAIL  {what}  ({detail})")

    def skip(self, what, detail):
        self.skipped += 1
        print(f"SKIP  {what}  ({detail})")

    def check(self, cond, what, detail):
        if cond:
            self.ok(what)
        else:
            self.fail(what, detail)
        return cond


def all_panels(panels):
    """Panels in order, with those nested in collapsed rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def validate(dash, report):
    """Structure Grafana needs to import (or provision) the dashboard."""
    report.check(
        isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36,
        "dashboard: schemaVersion",
        f"want an integer >= 36, got {dash.get('schemaVersion')!r}",
    )
    for key in ("uid", "title"):
        report.check(
            isinstance(dash.get(key), str) and dash[key].strip(),
            f"dashboard: {key}",
            "missing or empty",
        )
    report.check(dash.get("id") is None, "dashboard: id is null", "an id ties it to one Grafana")

    variables = (dash.get("templating") or {}).get("list")
    if not report.check(isinstance(variables, list), "dashboard: templating.list", "missing"):
        variables = []
    by_name = {v.get("name"): v for v in variables}
    ds = by_name.get("datasource") or {}
    report.check(
        ds.get("type") == "datasource" and ds.get("query") == "prometheus",
        "variable datasource",
        "want a variable named datasource of type datasource, query prometheus",
    )
    for v in variables:
        if v.get("type") != "query":
            continue
        name = v.get("name")
        problems = []
        if v.get("datasource") != DATASOURCE_REF:
            problems.append(f"datasource is {v.get('datasource')!r}")
        if not v.get("includeAll"):
            problems.append("no All option")
        if not variable_query(v):
            problems.append("no query")
        report.check(not problems, f"variable {name}", "; ".join(problems))

    panels = list(all_panels(dash.get("panels") or []))
    report.check(bool(panels), "dashboard: panels", "none")
    ids = [p.get("id") for p in panels]
    dupes = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    report.check(
        all(isinstance(i, int) for i in ids) and not dupes,
        "panels: unique integer ids",
        f"duplicates or missing: {dupes or ids}",
    )
    cells = {}
    for p in panels:
        title = p.get("title") or f"panel {p.get('id')}"
        g = p.get("gridPos") or {}
        problems = []
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"bad gridPos {g!r}")
        elif g["x"] < 0 or g["w"] < 1 or g["x"] + g["w"] > 24:
            problems.append(f"gridPos outside the 24 columns: {g!r}")
        else:
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    if (x, y) in cells:
                        problems.append(f"overlaps {cells[(x, y)]!r}")
                        break
                    cells[(x, y)] = title
                else:
                    continue
                break
        if p.get("type") != "row":
            if p.get("datasource") != DATASOURCE_REF:
                problems.append(f"datasource is {p.get('datasource')!r}, want {DATASOURCE_REF}")
            targets = p.get("targets") or []
            if not targets:
                problems.append("no targets")
            for t in targets:
                if not (isinstance(t.get("expr"), str) and t["expr"].strip()):
                    problems.append(f"target {t.get('refId')} has no expr")
                if t.get("datasource") not in (None, DATASOURCE_REF):
                    problems.append(f"target {t.get('refId')} datasource is {t.get('datasource')!r}")
        report.check(not problems, f"panel {title!r}: structure", "; ".join(problems))
    return variables, panels


def variable_query(v):
    q = v.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    return q if isinstance(q, str) and q.strip() else v.get("definition")


def substitute(expr, variables):
    names = {v.get("name"): v for v in variables}
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in names:
            if names[name].get("type") == "datasource":
                return "prometheus"
            return ".*"
        unknown.append(name)
        return m.group(0)

    return VAR_RE.sub(repl, expr), unknown


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")
        self._names = None

    def call(self, path, params):
        """GET, which every API endpoint takes (the label endpoints take no POST)."""
        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(self.url + path + ("?" + query if query else ""))
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
        except (urllib.error.URLError, OSError) as e:
            return {"status": "error", "error": f"cannot reach Prometheus: {e}"}
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"not JSON: {body[:200]!r}"}

    def metric_names(self):
        if self._names is None:
            answer = self.call("/api/v1/label/__name__/values", {})
            self._names = set(answer.get("data") or [])
        return self._names

    def missing_metrics(self, expr):
        names = self.metric_names()
        return sorted({m for m in METRIC_RE.findall(expr) if m not in names})


def describe(result):
    first = result[0]
    value = first.get("value", [None, "?"])[1]
    labels = {k: v for k, v in first.get("metric", {}).items() if k != "__name__"}
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{len(result)} series, first {{{shown}}} = {value}"


def run_queries(prom, variables, panels, report, allow_empty):
    for v in variables:
        if v.get("type") != "query":
            continue
        what = f"variable {v.get('name')}: {variable_query(v)}"
        query, unknown = substitute(variable_query(v) or "", variables)
        if unknown:
            report.fail(what, f"unknown variables {unknown}")
            continue
        m = LABEL_VALUES_RE.match(query)
        if not m:
            report.fail(what, "only label_values(...) queries are checked")
            continue
        selector, label = m.group(1), m.group(2)
        params = {"match[]": [selector]} if selector else {}
        answer = prom.call(f"/api/v1/label/{label}/values", params)
        if answer.get("status") != "success":
            report.fail(what, f"{answer.get('errorType', 'error')}: {answer.get('error')}")
        elif answer.get("data"):
            report.ok(what, ", ".join(answer["data"][:8]))
        else:
            empty(report, what, prom.missing_metrics(query), allow_empty)

    for p in panels:
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if not expr:
                continue
            what = f"{p.get('title')!r} [{t.get('refId')}]: {expr}"
            query, unknown = substitute(expr, variables)
            if unknown:
                report.fail(what, f"unknown variables {unknown}")
                continue
            answer = prom.call("/api/v1/query", {"query": query})
            if answer.get("status") != "success":
                report.fail(what, f"{answer.get('errorType', 'error')}: {answer.get('error')}")
                continue
            result = (answer.get("data") or {}).get("result")
            if result:
                report.ok(what, describe(result))
            else:
                empty(report, what, prom.missing_metrics(query), allow_empty)


def empty(report, what, missing, allow_empty):
    detail = "empty result"
    if missing:
        detail += "; no series of " + ", ".join(missing)
    if allow_empty and allow_empty.search(what):
        report.skip(what, detail + "; allowed by --allow-empty")
    else:
        report.fail(what, detail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dashboard", help="dashboard JSON file")
    ap.add_argument("--prometheus", help="Prometheus base URL; without it, only the structure is checked")
    ap.add_argument(
        "--allow-empty",
        metavar="REGEX",
        help="an empty result is not a failure for checks whose line matches REGEX "
        "(a parse error always is)",
    )
    args = ap.parse_args()

    report = Report()
    try:
        with open(args.dashboard, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL  {args.dashboard}: {e}")
        return 1
    if not isinstance(dash, dict):
        print(f"FAIL  {args.dashboard}: not a JSON object")
        return 1
    variables, panels = validate(dash, report)
    if args.prometheus:
        allow = re.compile(args.allow_empty) if args.allow_empty else None
        run_queries(Prometheus(args.prometheus), variables, panels, report, allow)
    summary = f"{report.passed} passed, {report.failed} failed"
    if report.skipped:
        summary += f", {report.skipped} skipped"
    print(summary)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
