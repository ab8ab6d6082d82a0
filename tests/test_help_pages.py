"""The help pages ComfyUI's node library shows for this pack: ``web/docs/<node id>.md``.

How they reach the panel (ComfyUI 0.3.64 and its frontend, comfyui-frontend-package 1.27.10):
``nodes.load_custom_node`` reads the package's ``WEB_DIRECTORY`` (before it looks for
``comfy_entrypoint``, so V3 packs too) into ``EXTENSION_WEB_DIRS[<folder name>]``;
``server.PromptServer.add_routes`` serves each one at ``/extensions/<folder name>/``.  The frontend's
``NodeHelpService.fetchCustomNodeHelp`` takes the folder name from the node's ``python_module``
(``custom_nodes.<folder>``, cut at "@") and fetches ``/extensions/<folder>/docs/<node id>/<locale>.md``,
then ``/extensions/<folder>/docs/<node id>.md``; without either it shows the node's description.

Without ComfyUI: the web directory is declared, every node id has a page and every page a node, each
page has its sections, and a registry archive keeps the pages.  Inside ComfyUI: ComfyUI registers the
folder under the name the frontend derives and serves each page over HTTP, and every page lists
exactly its node's inputs and outputs, with the schema's defaults, ranges and choices.

Page format, which these tests read: a short description, then ``## Inputs`` with the table
``| input | default | what it is |`` (one row per input; the default cell starts with the default in
backticks, "empty" for an empty string, or has no backticks when the schema has no default; "range
a–b" states min and max; for a combo every backticked word in the cell is one of its choices), then
``## Outputs`` with ``| output | what it is |`` (or "None" for a node without outputs), an optional
``## Official default`` and ``## Tip``.
"""

import asyncio
import glob
import importlib.util
import math
import os
import re

import pytest

from comfy_harness import REPO_ROOT

DOCS_DIR = os.path.join(REPO_ROOT, "web", "docs")
INPUTS_HEADER = ["input", "default", "what it is"]
OUTPUTS_HEADER = ["output", "what it is"]
REQUIRED_SECTIONS = ("Inputs", "Outputs", "Tip")
ALLOWED_SECTIONS = ("Inputs", "Outputs", "Official default", "Tip")
CODE_SPAN = re.compile(r"`([^`]+)`")
RANGE = re.compile(r"range (-?[\d.]+)–(-?[\d.]+)")
NUMBER_TYPES = {"INT": int, "FLOAT": float}


def _page_paths() -> dict[str, str]:
    return {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(DOCS_DIR, "*.md"))}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first ``## ``, {section title: its text})."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return parts[0], {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(body: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows) of the one Markdown table in a section; ([], []) when there is none."""
    lines = [line for line in body.splitlines() if line.lstrip().startswith("|")]
    if len(lines) < 2:
        return [], []
    return _cells(lines[0]), [_cells(line) for line in lines[2:]]


def _named_rows(rows: list[list[str]], where: str) -> dict[str, list[str]]:
    """name -> row, for rows whose first cell is one name in backticks."""
    named = {}
    for row in rows:
        match = re.fullmatch(r"`([^`]+)`", row[0])
        assert match, f"{where}: the first cell {row[0]!r} is not one name in backticks"
        assert match.group(1) not in named, f"{where}: {match.group(1)} is listed twice"
        named[match.group(1)] = row
    return named


def _declared_node_ids() -> set[str]:
    """The node ids written in the node layer's schemas (``node_id="..."``), wherever the files live."""
    ids = set()
    for path in glob.glob(os.path.join(REPO_ROOT, "nodes", "**", "*.py"), recursive=True):
        ids.update(re.findall(r"""node_id\s*=\s*["'](\w+)["']""", _read(path)))
    return ids


# --- without ComfyUI ----------------------------------------------------------------------------

def test_the_package_declares_the_web_directory_with_the_pages():
    spec = importlib.util.spec_from_file_location("consistentid_pack_entry", os.path.join(REPO_ROOT, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines WEB_DIRECTORY and comfy_entrypoint; imports nothing of ComfyUI
    assert callable(module.comfy_entrypoint)
    web_dir = os.path.normpath(os.path.join(REPO_ROOT, module.WEB_DIRECTORY))
    assert os.path.join(web_dir, "docs") == DOCS_DIR
    # ComfyUI also serves every .js file there as a frontend extension: the pack ships none.
    assert glob.glob(os.path.join(web_dir, "**", "*.js"), recursive=True) == []


def test_every_node_has_a_help_page_and_every_page_a_node():
    node_ids = _declared_node_ids()
    assert len(node_ids) >= 17, node_ids
    pages = set(_page_paths())
    assert sorted(node_ids - pages) == [], "nodes without a help page"
    assert sorted(pages - node_ids) == [], "help pages of no node"


@pytest.mark.parametrize("node_id", sorted(_page_paths()))
def test_help_page_has_its_sections(node_id):
    intro, sections = _sections(_read(_page_paths()[node_id]))
    assert intro.strip(), f"{node_id}: no description before the first section"
    assert not re.search(r"^# ", intro, flags=re.M), f"{node_id}: the panel shows the title itself"
    titles = list(sections)
    assert [t for t in REQUIRED_SECTIONS if t not in titles] == [], f"{node_id}: sections {titles}"
    assert [t for t in titles if t not in ALLOWED_SECTIONS] == [], f"{node_id}: unexpected sections"
    assert titles == [t for t in ALLOWED_SECTIONS if t in titles], f"{node_id}: sections out of order"
    assert sections["Tip"].strip(), f"{node_id}: empty tip"
    header, rows = _table(sections["Inputs"])
    assert header == INPUTS_HEADER and rows, f"{node_id}: the Inputs table"
    assert all(len(row) == len(INPUTS_HEADER) and all(row) for row in rows), f"{node_id}: an empty or extra cell"
    header, rows = _table(sections["Outputs"])
    if header:
        assert header == OUTPUTS_HEADER and rows, f"{node_id}: the Outputs table"
    else:
        assert sections["Outputs"].strip().startswith("None"), f"{node_id}: no Outputs table and not 'None'"


def test_a_registry_archive_keeps_the_help_pages():
    from test_node_metadata import _comfyignore_patterns, _ignored

    patterns = _comfyignore_patterns()
    pages = [os.path.relpath(p, REPO_ROOT).replace(os.sep, "/") for p in _page_paths().values()]
    assert pages
    assert [page for page in pages if _ignored(page, patterns)] == []


# --- inside ComfyUI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_infos(comfy):
    """What ComfyUI's /object_info sends the frontend, for every node ComfyUI registered from the pack."""
    return {node_id: comfy.node_class(node_id).GET_NODE_INFO_V1() for node_id in comfy.pack_node_ids()}


def _schema_inputs(info: dict) -> dict[str, tuple]:
    """name -> (io type, options) of the inputs a user connects or sets (hidden inputs left out)."""
    return {name: (spec[0], spec[1] if len(spec) > 1 else {})
            for group in ("required", "optional") for name, spec in (info["input"].get(group) or {}).items()}


def _frontend_pack_name(python_module: str) -> str:
    """What the frontend's extractCustomNodeName makes of a node's python_module."""
    parts = python_module.split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", python_module
    return parts[1].split("@")[0]


def _default_problems(name: str, io_type, options: dict, cell: str) -> list[str]:
    """Where the default cell of one input disagrees with its schema."""
    problems = []
    spans = CODE_SPAN.findall(cell)
    stated = spans[0] if cell.startswith("`") else None
    choices = io_type if isinstance(io_type, list) else options.get("options")
    kind = "COMBO" if choices is not None else io_type
    if "default" not in options:
        if stated is not None:
            problems.append(f"{name}: the page states the default {stated!r}; the schema has none")
    elif options["default"] == "":
        if not cell.startswith("empty"):
            problems.append(f"{name}: the default is the empty string; the page says {cell!r}")
    elif stated is None:
        problems.append(f"{name}: the page does not state the default {options['default']!r}")
    else:
        default = options["default"]
        if kind in NUMBER_TYPES:
            try:
                same = math.isclose(NUMBER_TYPES[kind](stated), default, rel_tol=1e-9, abs_tol=1e-12)
            except ValueError:
                same = False
        elif kind == "BOOLEAN":
            same = stated.lower() == str(default).lower()
        else:
            same = stated == default
        if not same:
            problems.append(f"{name}: the page says the default is {stated!r}, the schema {default!r}")
    stated_range = RANGE.search(cell)
    if stated_range:
        low, high = (float(v) for v in stated_range.groups())
        if kind not in NUMBER_TYPES or (low, high) != (options.get("min"), options.get("max")):
            problems.append(f"{name}: the page says range {low:g}–{high:g}, the schema "
                            f"{options.get('min')}–{options.get('max')}")
    if choices is not None:
        problems += [f"{name}: {span!r} is not one of its choices" for span in spans if span not in choices]
    return problems


@pytest.mark.comfyui
def test_comfyui_serves_the_pages_where_the_frontend_looks(comfy, node_infos):
    """The frontend's URL for each node resolves, through ComfyUI's registry of web folders, to its page."""
    assert node_infos
    missing = {}
    for node_id, info in node_infos.items():
        pack_name = _frontend_pack_name(info["python_module"])
        web_dir = comfy.nodes.EXTENSION_WEB_DIRS.get(pack_name)
        page = os.path.join(web_dir or "", "docs", f"{node_id}.md")
        if web_dir is None or not os.path.isfile(page):
            missing[node_id] = f"/extensions/{pack_name}/docs/{node_id}.md -> {page if web_dir else 'no web folder'}"
    assert missing == {}
    assert os.path.realpath(comfy.nodes.EXTENSION_WEB_DIRS[os.path.basename(REPO_ROOT)]) == \
        os.path.realpath(os.path.dirname(DOCS_DIR))


@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")  # ComfyUI's own routes
def test_comfyui_server_answers_the_help_page_url(comfy, node_infos):
    """ComfyUI's own routes (PromptServer.add_routes) answer the URL the frontend fetches, with the file."""
    import server
    from aiohttp.test_utils import TestClient, TestServer

    node_id = "ConsistentIDEncodeFace"
    pack_name = _frontend_pack_name(node_infos[node_id]["python_module"])
    expected = _read(_page_paths()[node_id])

    async def fetch() -> list[tuple[int, str]]:
        previous = server.PromptServer.instance  # the harness's stand-in; PromptServer() replaces it
        try:
            prompt_server = server.PromptServer(asyncio.get_running_loop())
            prompt_server.add_routes()
            async with TestClient(TestServer(prompt_server.app)) as client:
                answers = []
                for path in (f"/extensions/{pack_name}/docs/{node_id}.md",
                             f"/extensions/{pack_name}/docs/{node_id}/en.md"):
                    response = await client.get(path)
                    answers.append((response.status, await response.text()))
                return answers
        finally:
            server.PromptServer.instance = previous

    (status, text), (locale_status, _) = asyncio.run(fetch())
    assert status == 200 and text == expected
    assert locale_status == 404  # no per-locale page: the frontend falls back to <node id>.md


@pytest.mark.comfyui
def test_every_input_is_on_its_page_with_the_schema_default(node_infos):
    problems, pages = [], _page_paths()
    for node_id, info in sorted(node_infos.items()):
        if node_id not in pages:
            problems.append(f"{node_id}: no help page")
            continue
        _intro, sections = _sections(_read(pages[node_id]))
        rows = _named_rows(_table(sections["Inputs"])[1], f"{node_id} Inputs")
        inputs = _schema_inputs(info)
        problems += [f"{node_id}: input {name} is not on the page" for name in inputs if name not in rows]
        problems += [f"{node_id}: the page lists {name}, which the node does not have" for name in rows
                     if name not in inputs]
        for name, (io_type, options) in inputs.items():
            if name in rows:
                problems += [f"{node_id}: {p}" for p in _default_problems(name, io_type, options, rows[name][1])]
    assert problems == []


@pytest.mark.comfyui
def test_every_output_is_on_its_page(node_infos):
    problems, pages = [], _page_paths()
    for node_id, info in sorted(node_infos.items()):
        if node_id not in pages:
            problems.append(f"{node_id}: no help page")
            continue
        _intro, sections = _sections(_read(pages[node_id]))
        listed = list(_named_rows(_table(sections["Outputs"])[1], f"{node_id} Outputs"))
        if listed != list(info["output_name"]):
            problems.append(f"{node_id}: the page lists outputs {listed}, the node has {list(info['output_name'])}")
    assert problems == []
