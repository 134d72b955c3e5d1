"""The documentation says what the code does: links, drop reasons, registry events, command lines.

Each test reads the Markdown files as shipped (README.md, docs/*.md,
bench/README.md) and checks one class of claim against the code, so that a
renamed drop reason, counter or subcommand fails here instead of leaving a
page that misleads the operator.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text without its fenced code blocks (links and headings live outside them)."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(path.read_text()), re.M)}


def _section_rows(text: str, start: str) -> list[str]:
    """The lines of the first Markdown table after the line containing ``start``."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if start in line)
    rows = []
    for line in lines[index + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows


class DocumentLinksTests(SynchronousTestCase):
    """Links between the documents lead somewhere."""

    def test_relative_links_and_anchors_resolve(self):
        """Every relative Markdown link names a file of the repository, and its #anchor a heading there."""
        checked = 0
        for document in DOCUMENTS:
            for target in re.findall(r"\]\(([^)\s]+)\)", _prose(document.read_text())):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                path, _, anchor = target.partition("#")
                linked = (document.parent / path) if path else document
                self.assertTrue(linked.exists(), f"{document.name}: link to missing {target}")
                if anchor and linked.suffix == ".md":
                    self.assertIn(anchor, _anchors(linked),
                                  f"{document.name}: {target}: no such heading")
                checked += 1
        self.assertGreaterEqual(checked, 10)

    def test_named_documents_exist(self):
        """Every NAME.md the prose refers to (linked or not) is a file shipped with the project."""
        shipped = {path.name for path in DOCUMENTS} | {
            str(path.relative_to(ROOT)) for path in DOCUMENTS}
        checked = 0
        for document in DOCUMENTS:
            for name in re.findall(r"(?<![\w/.-])((?:docs/|bench/)?[\w-]+\.md)\b", document.read_text()):
                self.assertIn(name, shipped, f"{document.name} refers to {name}, which the "
                              "repository does not have")
                checked += 1
        self.assertGreaterEqual(checked, 10)   # the pattern still finds the prose's names


class DropReasonDocsTests(SynchronousTestCase):
    """docs/ssp-endpoint.md's table of drop reasons is the code's list of labels."""

    def test_table_lists_every_reason_and_no_other(self):
        """The reasons of the table equal DropReason and EndpointDrop together, the labels of broker_ssp_datagrams_dropped_total."""
        from broker.ssp.errors import DropReason
        from broker.udp.drops import EndpointDrop

        text = (ROOT / "docs" / "ssp-endpoint.md").read_text()
        documented = set()
        for row in _section_rows(text, "Every drop reason is a label"):
            documented.update(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
        code = {reason.value for reason in DropReason} | {reason.value for reason in EndpointDrop}
        self.assertEqual(documented, code)

    def test_reasons_named_in_prose_exist(self):
        """A name in parentheses in docs/ssp-endpoint.md's text, "(`reason`)", is a drop reason or an [ssp] setting."""
        import dataclasses

        from broker.config import SSPSettings
        from broker.ssp.errors import DropReason
        from broker.udp.drops import EndpointDrop

        code = {reason.value for reason in DropReason} | {reason.value for reason in EndpointDrop}
        settings = {spec.name for spec in dataclasses.fields(SSPSettings)}
        text = " ".join((ROOT / "docs" / "ssp-endpoint.md").read_text().split())
        named = set()
        for group in re.findall(r"\((`[a-z_]+`(?:, `[a-z_]+`)*)[,)]", text):
            named.update(re.findall(r"`([a-z_]+)`", group))
        self.assertGreaterEqual(len(named & code), 10)
        self.assertEqual(named - code - settings, set())


def _registry_events_documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in text.splitlines()
               if line.startswith("| `broker_registry_events_total"))
    return set(re.findall(r"`([a-z_<>]+)`", row.split("|")[3]))


def _registry_events_counted() -> tuple[set[str], set[str]]:
    """(event names counted literally, prefixes counted with a computed suffix) in broker/registry."""
    literal, prefixes = set(), set()
    for source in (ROOT / "broker" / "registry").glob("*.py"):
        text = source.read_text()
        literal.update(re.findall(r"counters\[\"([a-z_]+)\"\]", text))
        prefixes.update(re.findall(r"counters\[\"([a-z_]+_)\" \+", text))
    return literal, prefixes


class RegistryEventDocsTests(SynchronousTestCase):
    """The events listed for broker_registry_events_total in docs/operations.md are the registry's counters."""

    def expansions(self) -> set[str]:
        """The computed names: admin_<op> for each op broker-admin logs, rejected_<code> for each registry error."""
        from broker.registry import errors

        admin = (ROOT / "broker" / "registry" / "admin.py").read_text()
        ops = set(re.findall(r"self\._log\(\"([a-z_]+)\"", admin))
        codes = {kind.code for kind in vars(errors).values()
                 if isinstance(kind, type) and issubclass(kind, errors.RegistryError)}
        return {"admin_" + op for op in ops} | {"rejected_" + code for code in codes}

    def test_documented_events_are_counted(self):
        """Every event the table names is one the registry code increments (rejected_<code> as a family)."""
        literal, prefixes = _registry_events_counted()
        self.assertEqual(prefixes, {"admin_", "rejected_"})
        possible = literal | self.expansions()
        for event in _registry_events_documented():
            if "<" in event:
                self.assertIn(event.split("<")[0], prefixes, event)
                continue
            self.assertIn(event, possible, f"docs/operations.md names {event}, which nothing counts")

    def test_counted_events_are_documented(self):
        """Every event name the registry code increments literally, and every admin_<op>, is in the table."""
        literal, _ = _registry_events_counted()
        documented = _registry_events_documented()
        admin = {name for name in self.expansions() if name.startswith("admin_")}
        self.assertEqual((literal | admin) - documented, set())


def _shell_blocks(text: str) -> list[str]:
    """The contents of the fenced blocks marked sh (or unmarked), fences paired in order."""
    blocks, current, language = [], None, None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("", "sh", "bash", "console"):
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    """{name: sub-parser} of a parser's sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


class CommandLineDocsTests(SynchronousTestCase):
    """The broker-admin and broker-node command lines of the docs are ones the tools accept."""

    def commands(self, program: str):
        """(document, words after the program) of each code-block line, and of each inline span, running it."""
        lines, spans = [], []
        for document in DOCUMENTS:
            text = document.read_text()
            for block in _shell_blocks(text):
                for line in block.replace("\\\n", " ").splitlines():
                    match = re.search(rf"(?:^|[\s/]){program} (.*)", line)
                    if match:
                        command = re.split(r"\s+(?:#|>>|>|\|)", match.group(1))[0]
                        lines.append((document.name, command))
            for span in re.findall(rf"`(?:[\w./-]*/)?{program} ([^`]*)`", _prose(text)):
                spans.append((document.name, span))
        return lines, spans

    def check(self, program: str, parser: argparse.ArgumentParser) -> None:
        lines, spans = self.commands(program)
        self.assertTrue(lines)
        for document, command in lines:
            if "..." in command:
                continue  # an elided example
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage lines
                    parser.parse_args(shlex.split(command))
            except SystemExit:
                self.fail(f"{document}: `{program} {command}` is refused")
        for document, span in spans:
            words, value_next = [], False
            for word in shlex.split(span.replace("|", " ")):
                if word.startswith("-"):
                    value_next = word not in ("--json", "-h", "--help")
                elif value_next:
                    value_next = False  # an option's value, not a sub-command
                elif word != "...":
                    words.append(word)
            level = _subcommands(parser)
            for word in words:
                if not level:
                    break
                self.assertIn(word, level, f"{document}: `{program} {span}` names no sub-command")
                level = _subcommands(level[word])

    def test_broker_admin_lines_parse(self):
        """Every broker-admin line of a shell block parses, and every inline one names real sub-commands."""
        from broker.registry.cli import build_parser

        self.check("broker-admin", build_parser())

    def test_broker_node_lines_parse(self):
        """Every broker-node line of a shell block parses, and every inline one names real sub-commands."""
        from broker.node.cli import build_parser

        self.check("broker-node", build_parser())
