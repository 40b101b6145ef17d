"""A command's report as JUnit XML, the test-report format GitLab, Jenkins, Buildkite and GitHub's reporters read.

One testcase per thing checked: each adapter module (`inspect --base`), each adapter (`validate`), each serving rule that
applies to the engine (`check`), each tensor compared (`diff`), each tensor a merge would
change (`merge`/`unmerge --dry-run`). A problem becomes a failure of the testcase its subject
names (problems read `subject: what is wrong`); a problem or error naming nothing checked fails
one testcase named after the command, so a failed run never reads as a passing report.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["TestCase", "testcases", "junit_xml"]


@dataclass
class TestCase:
    """One testcase: what was checked, and every problem found in it."""

    __test__ = False  # not a pytest test class

    name: str
    failures: list[str] = field(default_factory=list)


def _subject(problem: str) -> str:
    return problem.split(": ", 1)[0]


def _belongs(problem: str, name: str) -> bool:
    """A problem about `name` names it, or one of its tensors (`name.lora_A.weight`), before its first ': '."""
    subject = _subject(problem)
    return subject == name or subject.startswith(name + ".")


def _checked(report: Mapping, rules: Sequence[str]) -> list[str]:
    """The names of what the report checked, in its order."""
    if "findings" in report:
        return list(rules)
    if "adapters" in report and "skipped" in report:
        return [adapter["path"] for adapter in report["adapters"]]
    if "modules" in report and report.get("validation") is not None:
        return [module["name"] for module in report["modules"]]
    if "tensors" in report and "only_in_a" in report:
        return [t["name"] for t in report["tensors"]] + list(report["only_in_a"]) + list(report["only_in_b"])
    if "changes" in report:
        return [change["tensor"] for change in report["changes"]]
    return []


def _finding_message(finding: Mapping) -> str:
    items = ", ".join(finding["items"])
    return f"{finding['effect']}: {finding['problem']}: {items} (fix: {finding['fix']})"


def testcases(
    command: str, report: Mapping | None, problems: Sequence[str], errors: Sequence[str], rules: Sequence[str] = ()
) -> list[TestCase]:
    """The testcases of one run: `report` is the command's JSON form (None when it failed before one)."""
    report = report or {}
    cases = {name: TestCase(name) for name in _checked(report, rules)}
    for finding in report.get("findings", ()):
        cases.setdefault(finding["rule"], TestCase(finding["rule"])).failures.append(_finding_message(finding))
    if "skipped" in report:  # validate: each adapter's problems are its own
        for adapter in report.get("adapters", ()):
            cases[adapter["path"]].failures += adapter["problems"]
    placed = {failure for case in cases.values() for failure in case.failures}
    validation = report.get("validation") or {}
    unplaced = []
    for problem in dict.fromkeys([*validation.get("problems", ()), *problems]):  # once each, in order
        if problem in placed:
            continue
        owners = [case for name, case in cases.items() if _belongs(problem, name)]
        for case in owners[:1]:
            case.failures.append(problem)
        if not owners:
            unplaced.append(problem)
    failed = any(case.failures for case in cases.values())
    if unplaced or (errors and not failed) or not cases:
        whole = TestCase(command, unplaced or ([] if failed else list(errors)))
        cases = {command: whole, **cases}
    return list(cases.values())


def junit_xml(
    command: str,
    report: Mapping | None,
    problems: Sequence[str] = (),
    errors: Sequence[str] = (),
    *,
    rules: Sequence[str] = (),
    warnings: Sequence[str] = (),
) -> str:
    """The JUnit XML document for one run of `loratool <command>` (a string; the caller writes it).

    Args:
        report: the command's report as in `--json` (None when it failed before making one).
        problems: the problems of the error the command ended with (e.g. every module that does not fit).
        errors: the `error:` lines it printed.
        rules: for `check`, the ids of the rules that apply to the engine (each is a testcase).
        warnings: the `warning:` lines, kept as the suite's system-err.
    """
    cases = testcases(command, report, problems, errors, rules)
    failures = sum(1 for case in cases if case.failures)
    seconds = f"{float((report or {}).get('seconds') or 0.0):.3f}"
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": "0", "time": seconds}
    root = ET.Element("testsuites", {"name": "loratool", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": f"loratool {command}", **counts})
    for case in cases:
        element = ET.SubElement(suite, "testcase", {"classname": f"loratool.{command}", "name": case.name})
        if case.failures:  # one failure element per testcase, as every reader expects
            failure = ET.SubElement(element, "failure", {"message": "; ".join(case.failures), "type": "loratool"})
            failure.text = "\n".join(case.failures)
    if warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(f"warning: {w}" for w in warnings)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
