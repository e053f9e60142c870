"""The README stays short and the docs stay consistent: live links, every figure in one place."""

import collections
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 350

# A measured figure: a number (or range) with a unit of time, rate, memory or
# speed-up, or a mean ± SEM. "3 x 3" and "1x1" are shapes, not figures.
_NUM = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
  rf"(?<![\w.-]){_NUM}(?:-{_NUM})?(?: ?(?:img/s|ms|s|min|GiB|MiB|KiB|GB|MB)\b|x\b)"
  rf"|(?<![\w.]){_NUM} ± {_NUM}"
)
# Markdown links and images to files of the repository: [text](path) / ![alt](path).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages():
  docs = os.path.join(REPO, "docs")
  names = sorted(n for n in os.listdir(docs) if n.endswith(".md"))
  return [os.path.join(REPO, "README.md")] + [os.path.join(docs, n) for n in names]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _anchor(heading):
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def figures(text):
  """The figures of a page, each once, in a normal form (one space before the unit)."""
  found = set()
  for match in FIGURE.finditer(text):
    figure = re.sub(r"(\d)(img/s|ms|s|min|GiB|MiB|KiB|GB|MB)\b", r"\1 \2", match.group(0))
    found.add(figure)
  return found


def test_readme_is_short():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    n = sum(1 for _ in f)
  assert n <= README_MAX_LINES, (
    f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})"
  )


def test_every_link_of_the_readme_and_docs_resolves():
  missing = []
  for page in _pages():
    for target in LINK.findall(_read(page)):
      if re.match(r"[a-z]+://", target):
        continue  # web addresses are not checked here
      path, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      rel = os.path.relpath(page, REPO)
      if not os.path.exists(full):
        missing.append(f"{rel}: {target} does not exist")
      elif anchor and full.endswith(".md"):
        anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", _read(full), re.M)}
        if anchor not in anchors:
          missing.append(f"{rel}: {target} names no heading of {os.path.relpath(full, REPO)}")
  assert not missing, "\n".join(missing)


def test_every_docs_page_is_linked_from_the_readme():
  linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(_read(_pages()[0]))}
  pages = {os.path.relpath(p, REPO) for p in _pages()[1:]}
  assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"


# Different measurements that print as the same text, with the only files allowed to print it:
# the maps demo's object image AUROC by map maximum (README) and the GMM's level 7 (densities).
COINCIDENCES = {"89.7 ± 0.5": ["README.md", "docs/densities.md"]}


def _where_figures():
  where = collections.defaultdict(list)
  for page in _pages():
    for figure in figures(_read(page)):
      where[figure].append(os.path.relpath(page, REPO))
  return where


def test_no_figure_is_printed_in_two_files():
  where = _where_figures()
  twice = {
    f: pages for f, pages in where.items() if len(pages) > 1 and COINCIDENCES.get(f) != pages
  }
  assert not twice, "figures printed in more than one file (keep one, link to it):\n" + "\n".join(
    f"  {f!r}: {', '.join(pages)}" for f, pages in sorted(twice.items())
  )


def test_every_listed_coincidence_is_still_printed_in_exactly_its_files():
  where = _where_figures()
  for figure, pages in COINCIDENCES.items():
    assert where.get(figure) == pages, (figure, where.get(figure))


@pytest.mark.parametrize(
  "text, want",
  [
    ("B4 at 12.9 img/s and 61 ms", {"12.9 img/s", "61 ms"}),
    ("94.5 ± 0.4, then 4.2 min and 0.86 GiB", {"94.5 ± 0.4", "4.2 min", "0.86 GiB"}),
    ("1.83-2.37x, 44x, 5.6-7.8x", {"1.83-2.37x", "44x", "5.6-7.8x"}),
    ("took 14 s; 120ms", {"14 s", "120 ms"}),
    ("3 x 3 taps, 1x1 convolutions, 64x64 inputs, level 8, 1e-4", set()),
    ("efficientnet-b4 at 380 px, batch 8, fold 0", set()),
  ],
)
def test_figures_are_found(text, want):
  assert figures(text) == want


def test_no_issue_numbers_in_the_prose():
  bad = []
  roots = [os.path.join(REPO, "README.md")]
  for top in ("docs", "jax_gad", "experiments", "tests", ".ci"):
    for root, _, names in os.walk(os.path.join(REPO, top)):
      roots += [
        os.path.join(root, n)
        for n in names
        if n.endswith((".md", ".py", ".cfg")) or top == ".ci"
        if not os.path.samefile(os.path.join(root, n), __file__)
      ]
  for path in roots:
    for i, line in enumerate(_read(path).splitlines(), 1):
      if re.search(r"\bissues? #?\d+", line, re.I):
        bad.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second():
  block = re.search(r"```bash\n(.*?)```", _read(os.path.join(REPO, "README.md")), re.S)
  commands = block.group(1).splitlines()
  assert commands == [
    "pip install -r requirements.txt && python -m jax_gad.main --flagfile=experiments/demo.cfg",
    "pip install -r requirements-test.txt && python -m pytest -q tests",
  ]
  assert commands[1] in _read(os.path.join(REPO, ".ci", "run")).splitlines()
