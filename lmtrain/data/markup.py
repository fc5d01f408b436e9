"""Stage 2: HTML and Markdown → plain text with light Markdown structure.

Both converters produce the same target: prose as paragraphs separated by a blank line, titles and
headings as ``# Heading`` lines, list items as ``- item`` / ``1. item`` (nested lists indented by two
spaces), and code blocks verbatim between ``````` fences. Links and images keep their text, markup
and boilerplate (``<script>``, ``<style>``, navigation chrome is not detected) is removed.

HTML uses the standard library's ``html.parser`` (no extra dependency); entities are decoded.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIP = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "head"}
_BLOCK = {
    "p", "div", "section", "article", "header", "footer", "main", "nav", "aside", "blockquote",
    "table", "thead", "tbody", "tr", "form", "figure", "figcaption", "address", "dl", "dt", "dd",
    "hr", "ul", "ol", "li", "pre", "title", "body", "html", "details", "summary",
    "h1", "h2", "h3", "h4", "h5", "h6",
}  # fmt: skip
_VOID = {
    "br",
    "hr",
    "img",
    "input",
    "meta",
    "link",
    "area",
    "base",
    "col",
    "embed",
    "source",
    "wbr",
}
_WS = re.compile(r"\s+")
_BR = re.compile(r" ?\x00 ?")
_ITEM = re.compile(r"\s*(- |\d+\. )")


class _HTMLToText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []  # finished blocks (paragraphs, headings, items, code)
        self.line: list[str] = []  # inline text of the current block
        self.prefix = ""  # "# " for headings, "- " for list items
        self.skip = 0  # depth inside <script>/<style>/<head>
        self.pre = 0  # depth inside <pre>
        self.pre_buf: list[str] = []
        self.lists: list[list] = []  # stack of [kind, counter]
        self.title: list[str] = []
        self.in_title = False
        self.in_cell = False

    def _flush(self) -> None:
        text = _WS.sub(" ", "".join(self.line))
        text = _BR.sub("\n", text).strip()
        if text:
            self.blocks.append(self.prefix + text)
        self.line, self.prefix = [], ""

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
            return
        if tag in _SKIP:
            self.skip += tag not in _VOID
            return
        if self.skip:
            return
        if self.pre:
            return
        if tag in ("td", "th"):
            if self.in_cell:
                self.line.append(" | ")
            self.in_cell = True
            return
        if tag == "br":
            self.line.append("\x00")
            return
        if tag == "img":
            alt = dict(attrs).get("alt") or ""
            if alt:
                self.line.append(alt)
            return
        if tag in _BLOCK:
            self._flush()
        if tag in ("ul", "ol"):
            self.lists.append([tag, 0])
        elif tag == "li":
            depth = max(len(self.lists) - 1, 0)
            kind = self.lists[-1] if self.lists else ["ul", 0]
            kind[1] += 1
            marker = f"{kind[1]}. " if kind[0] == "ol" else "- "
            self.prefix = "  " * depth + marker
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.prefix = "#" * int(tag[1]) + " "
        elif tag == "pre":
            self.pre = 1
            self.pre_buf = []

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
            return
        if tag in _SKIP:
            self.skip = max(self.skip - 1, 0)
            return
        if self.skip:
            return
        if tag == "pre" and self.pre:
            self.pre = 0
            code = "".join(self.pre_buf).strip("\n")
            if code.strip():
                self.blocks.append("```\n" + code + "\n```")
            return
        if self.pre:
            return
        if tag == "tr":
            self.in_cell = False
        if tag in _BLOCK:
            self._flush()
        if tag in ("ul", "ol") and self.lists:
            self.lists.pop()

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif self.skip:
            return
        elif self.pre:
            self.pre_buf.append(data)
        else:
            self.line.append(data)

    def text(self) -> str:
        self._flush()
        title = _WS.sub(" ", "".join(self.title)).strip()
        blocks = self.blocks
        if title and not (blocks and blocks[0].lstrip("# ") == title):
            blocks = ["# " + title] + blocks
        out: list[str] = []
        prev_item = False
        for b in blocks:  # consecutive list items stay together; other blocks are paragraphs
            item = _is_item(b)
            if out:
                out.append("\n" if item and prev_item else "\n\n")
            out.append(b)
            prev_item = item
        return "".join(out)


def _is_item(block: str) -> bool:
    return bool(_ITEM.match(block))


def html_to_text(html: str) -> str:
    """HTML document → text keeping the title, headings, lists and ``<pre>`` code blocks."""
    parser = _HTMLToText()
    parser.feed(html)
    parser.close()
    return parser.text()


_FENCE = re.compile(r"^(\s*)(```|~~~)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EM_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])")
_EM_UNDER = re.compile(r"(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])")
_SETEXT = re.compile(r"^(=+|-+)\s*$")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n(---|\.\.\.)\n", re.DOTALL)


def _inline(line: str) -> str:
    line = _IMAGE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _REF_LINK.sub(r"\1", line)
    line = _AUTOLINK.sub(r"\1", line)
    line = _TAG.sub("", line)
    line = _STRONG.sub(r"\2", line)
    line = _EM_STAR.sub(r"\1", line)
    return _EM_UNDER.sub(r"\1", line)


def markdown_to_text(md: str) -> str:
    """Markdown → text: headings, lists and fenced/indented code kept; links, images, emphasis,
    inline HTML, comments, reference definitions and YAML front matter removed."""
    md = _FRONT_MATTER.sub("", md, count=1)
    md = _COMMENT.sub("", md)
    out: list[str] = []
    fence = None
    for line in md.split("\n"):
        m = _FENCE.match(line)
        if fence is not None:
            out.append(line)
            if m and m.group(2) == fence:
                fence = None
            continue
        if m:
            fence = m.group(2)
            out.append(line.strip() if not m.group(1) else line)
            continue
        if line.startswith(("    ", "\t")) and (
            not out or not out[-1].strip() or out[-1].startswith(("    ", "\t"))
        ):
            out.append(line)  # indented code block: verbatim
            continue
        if _REF_DEF.match(line):
            continue
        if _SETEXT.match(line) and out and out[-1].strip() and not out[-1].startswith("#"):
            level = "#" if line.strip()[0] == "=" else "##"
            out[-1] = f"{level} {out[-1].strip()}"
            continue
        out.append(_inline(line))
    return "\n".join(out)


def sniff_format(text: str) -> str:
    """``html`` when the text starts like an HTML document, else ``text``."""
    head = text[:512].lstrip().lower()
    return "html" if head.startswith(("<!doctype html", "<html", "<head", "<body")) else "text"
